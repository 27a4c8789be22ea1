"""The block-wise core: geometry, sharding, run identities, done markers and the runner.

Every block-wise job (predict, each label phase) is a thin user of
:func:`catena_mito.blockwise.runner.run_blocks`; nothing here imports torch or zarr at
module level, so the CLI stays fast.
"""
