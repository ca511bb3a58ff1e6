"""The config: one dataclass per block (schema), cross-block checks, the run id, composition at the command line."""
