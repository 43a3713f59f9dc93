"""The OpenAI-compatible HTTP front door of `emoe serve --http-port`, and trace replay against
any OpenAI-compatible server (docs/http.md)."""
