"""The `suite` command line (`suite.cli.main:main`)."""
