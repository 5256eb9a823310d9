"""peftplan: will this fine-tuning run fit on my GPU, how long will it take, which method should I use?

The core (`estimate`, the catalogs, the methods) is pure Python: it imports neither torch nor pandas.
"""

__version__ = "0.1.0"
