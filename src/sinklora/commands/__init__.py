"""The ``sinklora`` commands: one module per command, each a typed config (``CONFIG``) and a thin
``main(cfg)`` that calls the library. Command modules import only torch-free modules at import time
(configs, defaults), so ``sinklora COMMAND --help`` never loads torch; ``main`` imports the library.
"""
