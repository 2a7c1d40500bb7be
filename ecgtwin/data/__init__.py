"""The data path: readers, preprocessing, site stores, the synthetic consortium."""
