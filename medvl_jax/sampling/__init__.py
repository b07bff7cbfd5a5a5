"""KV-cache generation (prefill + ``lax.while_loop`` decode) and sampling filters."""
