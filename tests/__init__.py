"""paperloop's tests: a package, so that tests, tests/support and the worker scripts import `tests.support` by one
name wherever they live (README.md beside this file)."""
