"""What uses a trained adapter: the MLflow Model that record_run logs (pricer), batch prediction
(`python -m serving.predict`) and the GGUF export for llama.cpp and Ollama."""
