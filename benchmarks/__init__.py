"""Speed and memory benchmarks (not tests): each prints its figures as
ratios against a peer measured in the same run. Run them from the
repository root, e.g. `python -m benchmarks.throughput --help`; the GPU
check is `benchmarks/gpu_check.sh`.
"""
