"""The tenant plane as a process holds it: the router to each tenant's store, and the
platform's signed artifacts (keys, licenses) verified and cached, so that tenants' work goes
on through a platform outage."""
