"""The per-model worker process: one loaded model behind the OpenAI API."""
