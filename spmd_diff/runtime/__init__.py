"""spmd_diff.runtime"""
