"""The `pagedkv` command line."""
