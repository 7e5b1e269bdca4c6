"""Everything that knows about ranks: layouts, dispatchers, and applying EP/TP/PP/DP to a built model."""
