"""The service against llama.cpp's own HTTP server (`make test-servers`)."""
