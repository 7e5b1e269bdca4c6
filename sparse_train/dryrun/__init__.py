"""The GPU dry run: a rank of a planned layout executed on fake CUDA tensors (docs/gpu.md).

fake_cuda  the fake device (a preloaded C++ library and torch.cuda stand-ins)
checks     the dispatch mode that finds host reads, CPU tensors and collectives on the wrong device
balanced   balanced routing where the dispatcher's split sizes are data-dependent
run        dry_run(): the trainer's build, step, reported step, evaluation and checkpoint save
"""
