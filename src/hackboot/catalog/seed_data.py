"""What the operator sells, as data: regions, zones, flavors and the list prices.

Every figure says where it comes from. The two seeds are:

* ``S000`` = ``shared/seeds/000_985107d9b0d95da6`` ("Infrastructure Hackboot - Documentation
  Technique"): the regions table ("Datacenters Opérationnels"), the product lines VPS-* and GPU-*
  ("Capacité par Produit"), the server configurations ("Serveurs Physiques").
* ``S003`` = ``shared/seeds/003_ca4acaebbfafb217`` ("Infrastructure Layer Design"): the VM instance
  types table (t3/c5/m5/g4, vCPU and RAM only), block storage tiers (§2.1), object storage
  classes (§2.2), the multi-AZ layout (§4.1) and "On-Demand" pricing (§7.1).

Where the seeds give no figure (VPS and GPU specs, disk sizes, every price) the value is our
choice and its ``source`` says so and why. ``service.seed()`` inserts the rows that are missing
and never touches existing ones, so an administrator's later edits survive restarts.

Prices are Hackboot's *list prices* in EUR, excluding VAT, on-demand (no commitment). The seeds
name the pricing models (S003 §7.1: on-demand, reserved, spot, savings plans) but give no amount;
these figures are ours, set to be consistent with each other (per vCPU, per GB of RAM, per GPU)
and with the "premium" positioning of S000. Only on-demand is modelled.
"""

from __future__ import annotations

from dataclasses import dataclass

S000 = "seed 000"
S003 = "seed 003"
HOURS_PER_MONTH = 730  # 24 * 365 / 12: how monthly prices are turned into hourly ones

# The EU member states (ISO 3166-1 alpha-2), to state data residency plainly.
EU_COUNTRIES = frozenset({
    "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE", "IT", "LV", "LT",
    "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE"})

# GPU models as they appear in flavors (gpu_model) and host inventories ("GPU:<model>").
GPU_MODELS: dict[str, str] = {
    "T4": "NVIDIA Tesla T4, 16 GB",
    "RTX4090": "NVIDIA GeForce RTX 4090, 24 GB",
    "A100": "NVIDIA A100, 80 GB",
}


@dataclass(frozen=True)
class RegionSeed:
    id: str
    name: str
    city: str
    country: str
    jurisdiction: str
    status: str
    peering: str
    zones: tuple[str, ...]
    source: str
    status_reason: str = ""
    available_from: str = ""
    note: str = ""


@dataclass(frozen=True)
class FlavorSeed:
    id: str
    family: str
    vcpus: int
    memory_mb: int
    disk_gb: int
    price_eur_hour: float
    description: str
    source: str
    gpu_model: str | None = None
    gpu_count: int = 0
    bandwidth_mbps: int = 1000


@dataclass(frozen=True)
class PriceSeed:
    sku: str
    kind: str  # flavor, volume, object_storage, network
    unit: str  # hour, GB-month
    amount_eur: float
    description: str


_ZONES_NOTE = (f"zones: {S003} §4.1 lays a region out as three availability zones; the built sites of "
               f"{S000} with 600+ vCPUs get three, LON1 (300 vCPUs) two, planned sites one to start")

LON1_NOTE = (
    "Data residency: London is in the United Kingdom, which left the EU on 2020-01-31. Data here is under UK "
    "law (UK GDPR, Data Protection Act 2018); EU-to-UK personal-data transfers rely on the European "
    "Commission's adequacy decision for the UK (2021), not on EU membership. " + S000 + " advertises "
    "'Data residency: Garantie EU' and 'Data 100% EU' for every site: that claim does not hold for LON1, so "
    "the catalog records jurisdiction UK, not EU. Do not use LON1 for data contractually bound to the EU.")

REGIONS: tuple[RegionSeed, ...] = (
    RegionSeed("PAR1", "Paris", "Paris", "FR", "EU", "operational", "France-IX (100G)",
               ("PAR1-a", "PAR1-b", "PAR1-c"),
               f"{S000} 'Datacenters Opérationnels': Paris PAR1, Operational, 600 vCPUs, France-IX (100G); "
               + _ZONES_NOTE),
    RegionSeed("FRA1", "Frankfurt", "Frankfurt am Main", "DE", "EU", "operational", "DE-CIX (100G)",
               ("FRA1-a", "FRA1-b", "FRA1-c"),
               f"{S000} 'Datacenters Opérationnels': Frankfurt FRA1, Operational, 800 vCPUs, DE-CIX (100G); "
               + _ZONES_NOTE),
    RegionSeed("AMS1", "Amsterdam", "Amsterdam", "NL", "EU", "operational", "AMS-IX (100G)",
               ("AMS1-a", "AMS1-b", "AMS1-c"),
               f"{S000} 'Datacenters Opérationnels': Amsterdam AMS1, Operational, 600 vCPUs, AMS-IX (100G); "
               + _ZONES_NOTE),
    RegionSeed("LON1", "London", "London", "GB", "UK", "maintenance", "LINX (40G)",
               ("LON1-a", "LON1-b"),
               f"{S000} 'Datacenters Opérationnels': Londres LON1, Maintenance, 300 vCPUs, LINX (40G); "
               + _ZONES_NOTE,
               status_reason="Site maintenance (announced without an end date)",
               note=LON1_NOTE),
    RegionSeed("MAD1", "Madrid", "Madrid", "ES", "EU", "planned", "ESPANIX", ("MAD1-a",),
               f"{S000} 'Datacenters Opérationnels': Madrid MAD1, Q2 2025, 400 vCPUs, 4x A100 planned, ESPANIX; "
               + _ZONES_NOTE,
               status_reason="New site: 400 vCPUs and 4x A100 planned", available_from="2025-Q2"),
    RegionSeed("MIL1", "Milan", "Milan", "IT", "EU", "planned", "MIX", ("MIL1-a",),
               f"{S000} 'Datacenters Opérationnels': Milan MIL1, Q3 2025, 400 vCPUs, 8x RTX 4090 planned, MIX; "
               + _ZONES_NOTE,
               status_reason="New site: 400 vCPUs and 8x RTX 4090 planned", available_from="2025-Q3"),
)

_VPS = (f"{S000} 'Capacité par Produit' (no specs given). Our sizing for VPS hosts of 128 threads, 512 GB, "
        f"~50-60 VPS each ({S000} 'Serveurs Physiques')")
_GPU = (f"{S000} 'Capacité par Produit' (no specs given): one GPU per instance. Our sizing for GPU hosts "
        f"of 96 threads, 256-768 GB, 4 or 8 GPUs ({S000} 'Configuration GPU')")
_T = f"{S003} §1.1 'VM Instance Types'"
_OURS = "disk size and price are ours (the seed gives vCPU and RAM only)"

FLAVORS: tuple[FlavorSeed, ...] = (
    # VPS line (S000). Monthly prices 5/15/30/80/160 EUR divided by 730 h.
    FlavorSeed("VPS-NANO", "vps", 1, 1024, 20, 0.0069, "1 vCPU, 1 GB RAM, 20 GB NVMe",
               f"{_VPS}: smallest step, 1 vCPU / 1 GB / 20 GB, ~5 EUR/month", bandwidth_mbps=250),
    FlavorSeed("VPS-STARTER", "vps", 2, 4096, 80, 0.0205, "2 vCPU, 4 GB RAM, 80 GB NVMe",
               f"{_VPS}: 2 vCPU / 4 GB / 80 GB, ~15 EUR/month", bandwidth_mbps=500),
    FlavorSeed("VPS-PERFORMANCE", "vps", 4, 8192, 160, 0.0411, "4 vCPU, 8 GB RAM, 160 GB NVMe",
               f"{_VPS}: 4 vCPU / 8 GB / 160 GB, ~30 EUR/month", bandwidth_mbps=1000),
    FlavorSeed("VPS-BUSINESS", "vps", 8, 32768, 320, 0.1096, "8 vCPU, 32 GB RAM, 320 GB NVMe",
               f"{_VPS}: 8 vCPU / 32 GB / 320 GB, ~80 EUR/month", bandwidth_mbps=2000),
    FlavorSeed("VPS-ENTERPRISE+", "vps", 16, 65536, 640, 0.2192, "16 vCPU, 64 GB RAM, 640 GB NVMe",
               f"{_VPS}: 16 vCPU / 64 GB / 640 GB, ~160 EUR/month", bandwidth_mbps=5000),
    # GPU line (S000): vCPU/RAM per GPU fit the host (96 threads, 4 or 8 GPUs, 256-768 GB).
    FlavorSeed("GPU-T4", "gpu", 8, 32768, 200, 0.45, "1x NVIDIA T4, 8 vCPU, 32 GB RAM, 200 GB NVMe",
               f"{_GPU}: T4 host of 4 GPUs",
               gpu_model="T4", gpu_count=1, bandwidth_mbps=5000),
    FlavorSeed("GPU-RTX4090", "gpu", 16, 65536, 500, 0.79, "1x RTX 4090, 16 vCPU, 64 GB RAM, 500 GB NVMe",
               f"{_GPU}: RTX 4090 host of 4 GPUs",
               gpu_model="RTX4090", gpu_count=1, bandwidth_mbps=10000),
    FlavorSeed("GPU-A100", "gpu", 12, 98304, 1000, 2.19, "1x NVIDIA A100, 12 vCPU, 96 GB RAM, 1 TB NVMe",
               f"{_GPU}: A100 host of 8 GPUs, 768 GB",
               gpu_model="A100", gpu_count=1, bandwidth_mbps=25000),
    # Instance types of S003, vCPU and RAM exactly as the seed's table.
    FlavorSeed("t3.micro", "general", 2, 1024, 10, 0.0110, "Development, testing",
               f"{_T}: t3.micro 2 vCPU, 1GB; {_OURS}"),
    FlavorSeed("t3.small", "general", 2, 2048, 20, 0.0190, "Small applications",
               f"{_T}: t3.small 2 vCPU, 2GB; {_OURS}"),
    FlavorSeed("t3.medium", "general", 2, 4096, 40, 0.0380, "Web servers",
               f"{_T}: t3.medium 2 vCPU, 4GB; {_OURS}"),
    FlavorSeed("t3.large", "general", 2, 8192, 80, 0.0760, "Databases",
               f"{_T}: t3.large 2 vCPU, 8GB; {_OURS}"),
    FlavorSeed("c5.xlarge", "compute", 4, 8192, 80, 0.1620, "Compute-intensive",
               f"{_T}: c5.xlarge 4 vCPU, 8GB; {_OURS}", bandwidth_mbps=10000),
    FlavorSeed("m5.2xlarge", "memory", 8, 32768, 160, 0.3840, "Memory-intensive",
               f"{_T}: m5.2xlarge 8 vCPU, 32GB; {_OURS}", bandwidth_mbps=10000),
    FlavorSeed("g4.xlarge", "gpu", 4, 16384, 125, 0.5200, "AI/ML workloads, 1x NVIDIA T4",
               f"{_T}: g4.xlarge 4 vCPU, 16GB + GPU; the GPU is a T4 (the seed names none; T4 is the "
               f"inference GPU of {S000}); {_OURS}", gpu_model="T4", gpu_count=1, bandwidth_mbps=25000),
)

_LIST = "Hackboot list price, EUR excl. VAT, on-demand"
STORAGE_PRICES: tuple[PriceSeed, ...] = (
    # Block storage tiers: S003 §2.1 "Storage Tiers"
    PriceSeed("volume:ssd-performance", "volume", "GB-month", 0.12,
              f"{_LIST}. {S003} §2.1 SSD Performance: NVMe, <1ms, 100K+ IOPS"),
    PriceSeed("volume:ssd-standard", "volume", "GB-month", 0.08,
              f"{_LIST}. {S003} §2.1 SSD Standard: <5ms, 10K IOPS"),
    PriceSeed("volume:hdd-standard", "volume", "GB-month", 0.04,
              f"{_LIST}. {S003} §2.1 HDD Standard: <10ms, 1K IOPS"),
    PriceSeed("volume:archive", "volume", "GB-month", 0.01,
              f"{_LIST}. {S003} §2.1 Archive: cold storage, optimized for cost"),
    # Object storage classes: S003 §2.2 "Storage Classes"
    PriceSeed("s3:STANDARD", "object_storage", "GB-month", 0.02,
              f"{_LIST}. {S003} §2.2 Standard: frequently accessed data"),
    PriceSeed("s3:STANDARD_IA", "object_storage", "GB-month", 0.0125,
              f"{_LIST}. {S003} §2.2 Infrequent Access: lower cost"),
    PriceSeed("s3:GLACIER", "object_storage", "GB-month", 0.004,
              f"{_LIST}. {S003} §2.2 Glacier: long-term archive, lowest cost"),
    PriceSeed("s3:INTELLIGENT_TIERING", "object_storage", "GB-month", 0.02,
              f"{_LIST}. {S003} §2.2 Intelligent Tiering: billed at the Standard rate (no monitoring fee)"),
)


# VPC networking: S003 §3.1 draws the VPC with an "Internet Gateway / NAT" but prices nothing. The VPC,
# its subnets, interfaces and security groups are free (as at the large clouds); what holds scarce
# public IPv4 space, and the gateway that translates for a whole VPC, are priced by the hour. Our
# figures: a floating IP ~3.65 EUR/month, attached or not (a held address is one nobody else can use);
# a NAT gateway ~32.85 EUR/month, its floating IP priced apart.
NETWORK_PRICES: tuple[PriceSeed, ...] = (
    PriceSeed("network:floating-ip", "network", "hour", 0.005,
              f"{_LIST}, per hour a floating IP is allocated. {S003} §3.1 (VPC, Internet Gateway); amount ours"),
    PriceSeed("network:nat-gateway", "network", "hour", 0.045,
              f"{_LIST}, per hour a NAT gateway exists (its floating IP priced apart). {S003} §3.1 (VPC, NAT); "
              "amount ours"),
    # Load balancers (S003 §3.2 names them, prices nothing): ~18.25 EUR/month per load balancer, whatever its
    # listeners and pools; an internet-facing one's floating IP is priced apart.
    PriceSeed("network:load-balancer", "network", "hour", 0.025,
              f"{_LIST}, per hour a load balancer exists (its floating IP priced apart). {S003} §3.2 Load Balancing; "
              "amount ours"),
)


# Serverless functions (S003 names them, prices nothing): billed like AWS Lambda, by memory × duration
# (GB-seconds, durations rounded up to the millisecond) and per request. Amounts ours, a little under
# Lambda's list prices; the catalog keeps six decimals, which 0.000016 fits exactly.
FUNCTION_PRICES: tuple[PriceSeed, ...] = (
    PriceSeed("function:gb-second", "function", "GB-second", 0.000016,
              f"{_LIST}, per GB-second a function runs (memory × duration, rounded up to the ms). {S003} "
              "serverless functions; amount ours"),
    PriceSeed("function:invocations", "function", "1M invocations", 0.18,
              f"{_LIST}, per million function invocations, whatever their trigger. {S003} serverless "
              "functions; amount ours"),
)


def flavor_prices() -> tuple[PriceSeed, ...]:
    return tuple(PriceSeed(f.id, "flavor", "hour", f.price_eur_hour,
                           f"{_LIST}, per hour ({f.description})") for f in FLAVORS)


def all_prices() -> tuple[PriceSeed, ...]:
    """The global price list (region_id NULL: valid in every region unless overridden)."""
    return flavor_prices() + STORAGE_PRICES + NETWORK_PRICES + FUNCTION_PRICES
