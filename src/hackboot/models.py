"""Every service's tables, imported so that Alembic and tests see the whole schema."""

from hackboot.catalog import models as catalog_models  # noqa: F401
from hackboot.compute import models as compute_models  # noqa: F401
from hackboot.core import idempotency, quotas  # noqa: F401
from hackboot.core.db import Base
from hackboot.events import models as events_models  # noqa: F401
from hackboot.functions import asyncq as functions_asyncq  # noqa: F401
from hackboot.functions import models as functions_models  # noqa: F401
from hackboot.identity import models as identity_models  # noqa: F401
from hackboot.images import models as images_models  # noqa: F401
from hackboot.loadbalancers import models as loadbalancers_models  # noqa: F401
from hackboot.network import hosts as network_hosts  # noqa: F401
from hackboot.network import models as network_models  # noqa: F401
from hackboot.objectstore import models as objectstore_models  # noqa: F401
from hackboot.volumes import models as volumes_models  # noqa: F401

metadata = Base.metadata
