"""The OpenAI ↔ engine translation that is more than field copying: structured-output constraints, chat
templates with tools, and tool-call parsing. Importable and testable without HTTP."""
