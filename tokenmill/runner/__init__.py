"""The local runner: `tokenmill run DIR` runs a recipe's resources in order on one machine."""
