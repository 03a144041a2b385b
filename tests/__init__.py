"""mailroute's test suite: unit tests, worker tests on the memory transport, integration tests."""
