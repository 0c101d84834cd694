"""The experiments: what each DVC stage computes, built on the library beside it (config, data,
models, training, hypergrad, tracking). A stage entry point in `stages/` parses its options and
calls one `run` here; nothing here parses the command line."""
