"""Cross-model query adapter (ERA): a large query encoder projected into a small encoder's document space."""
