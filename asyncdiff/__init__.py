"""AsyncDiff core: stage graph, partitioner, components, schedule and reference runners.

Nothing here imports Triton: the export tools, the Triton BLS backend and the
torch.distributed runner all build on these definitions.
"""
