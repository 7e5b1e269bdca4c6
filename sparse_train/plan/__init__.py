"""`sparse-train plan`: the layouts a cluster admits for a model, their per-rank memory and step
time, measured on the real model code (work in progress: issue 19; docs/decisions.md §53)."""
