"""chunkcache inside the frameworks users already have: `chunkcache.integrations.langchain` and
`chunkcache.integrations.llama_index`. Each imports its framework only when imported itself; install
them with `pip install "chunkcache[langchain]"` or `"chunkcache[llama-index]"`."""
