"""The `cdt` command line: thin entry points over model/, training/ and service/."""
