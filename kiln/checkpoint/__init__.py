"""kiln.checkpoint"""
