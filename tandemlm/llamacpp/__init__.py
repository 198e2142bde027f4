"""llama.cpp itself, from the source the installed llama-cpp-python vendors: its Python converters (``sources``)
and its programs built once into the cache (``programs``: llama-imatrix, llama-bench, llama-server, ...)."""
