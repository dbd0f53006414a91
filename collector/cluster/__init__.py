"""Partitioned collectors on a NATS JetStream cluster (issue 12): which terminals are whose, and failover.

(See the end of this docstring for what is and is not done.)
"""
