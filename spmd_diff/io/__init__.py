"""spmd_diff.io"""
