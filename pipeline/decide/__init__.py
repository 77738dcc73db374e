"""The decision layer: which images are flagged, which duplicate each other, and what happens to
each (flagging, embeddings, dedup, remediate: the one owner of a row's action). Uses score/ to
re-score augmentations; imports nothing from run/.
"""
