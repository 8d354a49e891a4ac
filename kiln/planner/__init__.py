"""kiln.planner"""
