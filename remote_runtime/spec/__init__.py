"""The contract between the operator (`megafleet`, no torch) and the nodes (`remote_runtime`).

Everything both sides need lives here and imports neither torch, megatron nor transformers
(tests/unit/test_spec_boundary.py checks both rules):

    config      the job schema (`JobConfig`), option names, aliases, validation
    flags       command-line flags and job YAML files <-> JobConfig
    yamlio      YAML reading that remembers file lines
    errors      ConfigError / DataError / RowError: structured (field, message, hint) problems
    families    the model families' declarations (config.json -> megatron settings, name tables)
    resolve     a job resolved against config.json and a world size (parallel arithmetic)
    shape       one model shape: parameter counts and training FLOPs
    layout      the output layout: checkpoint directories, trainer state, the metrics file
    formats     the dataset row formats
"""
