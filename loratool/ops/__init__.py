"""Operations on in-memory adapters and any mapping of tensors: one module per operation."""
