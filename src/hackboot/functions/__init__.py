"""Serverless functions: Python and Node.js handlers in bubblewrap sandboxes, with HTTP, schedule, object
storage and queue triggers."""
