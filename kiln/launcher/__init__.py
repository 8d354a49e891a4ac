"""kiln.launcher"""
