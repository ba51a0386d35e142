"""Managed load balancers: one HAProxy per load balancer, in its own namespace attached to a VPC subnet."""
