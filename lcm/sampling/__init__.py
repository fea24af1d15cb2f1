"""Sampling internals behind lcm.pipeline.Pipeline: input guards, infotext, PNG and grid writing."""
