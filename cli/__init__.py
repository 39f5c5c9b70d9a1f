"""The `tedcache` command line (installed as the tedcache.cli package)."""
