"""spmd_diff.parallel"""
