"""What several test files share: spawned process groups, documents, loaders, models, runs, comparisons."""
