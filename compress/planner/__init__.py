"""Plan: a recipe's `target:` becomes an ordinary recipe, chosen by measuring candidates."""
