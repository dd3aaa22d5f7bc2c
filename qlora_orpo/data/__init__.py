"""Reading preference data and turning it into tokens: sources, rows, chat templates, collation.

``sources`` reads files (JSONL, JSON, CSV, Parquet, gzip, hub datasets), ``preferences``
recognises row shapes and holds out a share, ``mixture`` combines several sources and an
evaluation file, ``chat_templates`` holds ``--chat-template``'s built-ins, ``templating``
renders pairs through the chat template into token ids and labels, ``collate`` pads them into batches and
``sampling`` deals batches out in a resumable order. Imports ``core`` and ``config`` only.
"""
