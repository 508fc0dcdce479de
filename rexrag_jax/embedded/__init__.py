"""The embedded default: a complete REX-RAG experiment on a laptop CPU (synthetic world -> warm start ->
GRPO vs REX-RAG -> report). Entry point: `rexrag-demo` (`make demo`)."""
