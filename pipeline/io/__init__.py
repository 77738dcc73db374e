"""The input/output layer: sources and decoding (data), Parquet schemas and atomic writers
(store), the outputs of a run (outputs, manifest) and its report. Imports nothing from run/.
"""
