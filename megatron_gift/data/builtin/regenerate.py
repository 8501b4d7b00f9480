"""`python -m megatron_gift.data.builtin.regenerate`: rewrite the shipped demo files."""
from megatron_gift.data.builtin import regenerate

if __name__ == "__main__":
    print(regenerate())
