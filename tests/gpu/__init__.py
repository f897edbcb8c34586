"""GPU tests (``-m gpu``). A package so that tests/gpu/test_<op>.py may share a basename with tests/ops/test_<op>.py."""
