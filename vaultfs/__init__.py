"""vaultfs: an encrypted, erasure-coded, post-quantum vault over rclone remotes."""

__version__ = "0.1.0"
