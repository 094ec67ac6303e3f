"""spmd_diff.plan"""
