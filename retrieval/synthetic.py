"""A deterministic synthetic shop: a ~2,400-item catalog and an event log with structure a recommender can learn.

Used by the demo, by tests that must run anywhere, and as a sanity dataset for retrievers. What is built in:

- a 20-category taxonomy (2-3 levels) with made-up brands in budget/mid/premium tiers; prices are lognormal per
  subcategory and tier, titles read like "Voltix Slim Shockproof Phone Case for 6.1-inch, Midnight Blue";
- ~50 chains of complementary subcategories (smartphone -> phone case -> charger, printer -> ink -> paper, ...);
- users with Dirichlet category affinities, a price band and brand loyalty, who browse in sessions that stay in one
  category, sometimes cart and buy, and after a purchase often go on to a complement (same or next session);
- long-tailed (Zipf) item appeal, short cold-ish users, and brand-new items with no events at all (cold start).

What it does not do: ratings, returns, search queries, seasonality, or prices that change over time.
Numpy only, and every random draw comes from one `numpy.random.default_rng(seed)` in a fixed order, so the same
config gives byte-identical data on every machine. `python -m retrieval.synthetic --out DIR` writes it to disk.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

from retrieval.types import Interaction, InteractionType, Item

# --------------------------------------------------------------------------------------------------------------------
# Taxonomy: top-level categories with brands and title adjectives, then leaf subcategories with their vocabularies.
# --------------------------------------------------------------------------------------------------------------------

TIERS = ("budget", "mid", "premium")
_TIER_PRICE = (0.55, 1.0, 2.1)  # price multiplier of a tier relative to the subcategory's mid-tier median
_PRICE_SIGMA = 0.25  # lognormal spread within one subcategory and tier
# Rows: the user's price band; columns: the item's tier. Off-band items still get some attention.
_TIER_MATCH = np.array([[1.0, 0.35, 0.06], [0.4, 1.0, 0.4], [0.08, 0.45, 1.0]])


@dataclass(frozen=True)
class _Top:
    name: str
    brands: tuple[tuple[str, ...], ...]  # brand names per tier: budget, mid, premium (two each)
    adjectives: tuple[str, ...]  # title adjectives: "Voltix *Slim* Phone Case"


def _top(name: str, budget: str, mid: str, premium: str, adjectives: str) -> _Top:
    return _Top(name, tuple(tuple(s.split("|")) for s in (budget, mid, premium)), tuple(adjectives.split("|")))


_TOPS: tuple[_Top, ...] = (
    _top("Electronics", "Voltix|Zentro", "Arclite|Nuvia", "Aurelon|Lumenar",
         "Slim|Pro|Ultra|Compact|Essential|Max|Lite|Plus"),
    _top("Home & Kitchen", "HomeBasics|Kitchara", "Brewstone|Oakhaven", "Maison Vell|Copperly",
         "Classic|Modern|Everyday|Rustic|Compact|Artisan|Nordic"),
    _top("Sports & Outdoors", "Stridex|Peakline", "Trailwise|Corevo", "Summitra|Veloria",
         "Pro|Trail|Lightweight|Performance|All-Weather|Endurance|Active|Elite"),
    _top("Beauty", "Dewdrop|Purelle", "Lumiskin|Botaniq", "Maison Ambre|Velvetine",
         "Gentle|Daily|Hydrating|Radiant|Pure|Nourishing|Advanced|Soothing"),
    _top("Books", "Pocketleaf Books|Riverbend Press", "Harbor Lane Press|Northlight Publishing",
         "Quillstone House|Atlas & Finch", "Classic|Compact|Deluxe|Everyday"),
    _top("Toys & Games", "Playnest|Bricko", "Funforge|Tinkertown", "Wondercraft|Orbitoy",
         "Deluxe|Classic|Mega|Junior|Adventure|Creative|Ultimate"),
    _top("Office Products", "Deskmate|Inkwell Basics", "Paperline|Officio", "Scriptura|Ergonova",
         "Classic|Executive|Everyday|Pro|Compact|Ergonomic"),
    _top("Garden & Outdoor", "GreenThumb|Sproutly", "Terracove|Bloomfield", "Verdanta|Hearthfire",
         "Heavy-Duty|Classic|Organic|Weatherproof|Compact|Easy-Care"),
    _top("Pet Supplies", "Pawsome|Happy Tails", "Furrever|Barkley & Co", "Regal Paws|Wildcrest",
         "Natural|Durable|Cozy|Everyday|Active|Gentle|Deluxe"),
    _top("Grocery", "Pantry Plain|Goodfield", "Rustica|Morning Ridge", "Casa Oliva|Bramblewood Farm",
         "Organic|Classic|Artisan|Fair Trade|Everyday|Small-Batch"),
    _top("Fashion", "Basix|UrbanThread", "Northweave|Milo & Jade", "Atelier Rove|Castellan",
         "Classic|Slim-Fit|Relaxed|Essential|Vintage|Modern|Casual"),
    _top("Baby", "Tiny Steps|Cuddlebug", "Little Oak|Nestling", "Bellamoon|Cradlewood",
         "Gentle|Soft|Cozy|Essential|Organic|Snuggle"),
    _top("Automotive", "Autoline|Gearnet", "Drivemax|Torquo", "Velocor|Carbonis",
         "Heavy-Duty|Pro|Advanced|Universal|Performance"),
    _top("Health & Household", "Wellbasics|Carelane", "Vitalis|Medico Plus", "Thrivon|Purevita Labs",
         "Daily|Advanced|Essential|Gentle|Pro|Complete"),
    _top("Musical Instruments", "Tunely|Stagehand", "Resona|Cadenza", "Bellwood|Sonorath",
         "Classic|Studio|Pro|Vintage|Stage|Student"),
    _top("Video Games", "Pixelpop|Arcadia Games", "Nimbus Interactive|Ironleaf Studios", "Novastar|Helix Entertainment",
         "Pro|Elite|Wireless|Ultra|Classic|Turbo"),
    _top("Tools & Home Improvement", "Handyman Pro|Toolcraft", "Forgeline|Steelbird", "Titanforge|Precisa",
         "Heavy-Duty|Pro|Compact|Precision|Industrial|Essential"),
    _top("Jewelry", "Glimmer|Charmly", "Aurora & Pearl|Lunette", "Maison Solenne|Everstone",
         "Classic|Delicate|Vintage|Minimalist|Elegant|Dainty"),
    _top("Luggage & Travel", "Roamwell|Jetpack Basics", "Globetrek|Wayfarer & Co", "Voyageur|Altair Travel",
         "Lightweight|Classic|Urban|Explorer|Essential|Voyager"),
    _top("Arts & Crafts", "Craftbox|Colorpop", "Easelworks|Artisanne", "Maestro Fine Art|Vellum & Co",
         "Artist|Studio|Professional|Student|Classic"),
)  # fmt: skip

MAX_CATEGORIES = len(_TOPS)


@dataclass(frozen=True)
class _Leaf:
    path: tuple[str, ...]
    nouns: tuple[str, ...]  # product nouns for the title; for books and games, the genre
    price: float  # median price of a mid-tier item
    features: tuple[str, ...]  # phrases the description is built from
    variant: tuple[str, tuple[str, ...]] | None  # (attribute, values): shown in the title and kept as an attribute
    variant_fmt: str  # how the variant reads in the title, e.g. "for {}"
    attrs: tuple[tuple[str, tuple[str, ...]], ...]  # further attributes, kept but not in the title
    colored: bool  # whether items get a color (shown at the end of the title)
    kind: str  # "product", "book" or "game": books and games get made-up titles instead of brand + noun
    words: tuple[tuple[str, ...], tuple[str, ...]]  # (adjectives, nouns) for book and game titles

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def key(self) -> str:
        return " > ".join(self.path)


def _kv(spec: str) -> tuple[str, tuple[str, ...]]:
    key, _, values = spec.partition(":")
    return key.strip(), tuple(v.strip() for v in values.split("|"))


def _leaf(
    path: str,
    nouns: str,
    price: float,
    features: str,
    *,
    variant: str = "",
    fmt: str = "{}",
    attrs: str = "",
    colored: bool = True,
    kind: str = "product",
    words: str = "",
) -> _Leaf:
    adj, _, nns = words.partition("/")
    return _Leaf(
        path=tuple(p.strip() for p in path.split(">")),
        nouns=tuple(nouns.split("|")),
        price=price,
        features=tuple(features.split("|")),
        variant=_kv(variant) if variant else None,
        variant_fmt=fmt,
        attrs=tuple(_kv(a) for a in attrs.split(";")) if attrs else (),
        colored=colored,
        kind=kind,
        words=(tuple(adj.split("|")), tuple(nns.split("|"))) if words else ((), ()),
    )


_SIZES = "size: S|M|L|XL"
_AGES = "age: 3+|6+|8+|12+"
_METALS = "material: Sterling Silver|14k Gold Plated|Stainless Steel|Rose Gold Plated"
_SKIN = "skin type: All Skin Types|Oily Skin|Dry Skin|Sensitive Skin"

_GAME_FEATURES = (
    "an open world|a cinematic story|co-op multiplayer|over 40 hours of play|a photo mode|online leaderboards"
)


def _book(path: str, genres: str, price: float, features: str, words: str) -> _Leaf:
    """A book subcategory: made-up titles from `words` ("adjectives/nouns"), the publisher as brand."""
    variant = "format: Paperback|Hardcover|Large Print"
    return _leaf(path, genres, price, features, variant=variant, colored=False, kind="book", words=words)


def _game(path: str, genre: str, price: float, words: str) -> _Leaf:
    """A video game subcategory: made-up titles from `words`, the studio as brand, a platform and an edition."""
    return _leaf(
        path, genre, price, _GAME_FEATURES, variant="platform: Nova Station 5|Pixelbox Series X|PC",
        attrs="edition: Standard Edition|Deluxe Edition|Gold Edition", colored=False, kind="game", words=words,
    )  # fmt: skip


_LEAVES: tuple[_Leaf, ...] = (
    # Electronics
    _leaf("Electronics > Phones & Accessories > Smartphones", "5G Smartphone|Smartphone", 450,
          "a 6.5-inch OLED display|all-day battery life|a triple-lens camera|fast charging|dual SIM support|"
          "face unlock",
          variant="storage: 128GB|256GB|512GB"),
    _leaf("Electronics > Phones & Accessories > Phone Cases", "Shockproof Phone Case|Phone Case|Wallet Phone Case", 18,
          "raised edges that protect the screen|reinforced corners|a grippy textured back|wireless charging support|"
          "precise button cutouts", variant="fits: 6.1-inch|6.7-inch|5.8-inch", fmt="for {}",
          attrs="material: Silicone|TPU|Vegan Leather|Polycarbonate"),
    _leaf("Electronics > Phones & Accessories > Chargers & Cables",
          "USB-C Fast Charger|Dual-Port Wall Charger|GaN Charger", 22,
          "fast charging|a braided USB-C cable in the box|overheat protection|a compact foldable plug|"
          "universal compatibility",
          variant="power: 20W|30W|65W"),
    _leaf("Electronics > Cameras & Photo > Cameras", "Mirrorless Camera|Compact System Camera|Vlogging Camera", 650,
          "a 24MP sensor|4K video recording|in-body image stabilization|fast autofocus|a flip-out touchscreen|"
          "weather sealing", variant="kit: Body Only|with 18-55mm Lens"),
    _leaf("Electronics > Cameras & Photo > Memory Cards", "SD Memory Card|microSD Card|CFexpress Card", 25,
          "read speeds up to 170MB/s|V30 video speed class|water and shock resistance|4K recording support",
          variant="capacity: 64GB|128GB|256GB", colored=False),
    _leaf("Electronics > Cameras & Photo > Tripods", "Travel Tripod|Camera Tripod|Video Tripod", 60,
          "a ball head with quick release plate|flip leg locks|a built-in bubble level|a removable center column",
          variant="height: 140cm|160cm|180cm", attrs="material: Aluminum|Carbon Fiber"),
    _leaf("Electronics > Computers > Laptops", "Laptop|Ultrabook|2-in-1 Laptop", 850,
          "a 14-inch full HD display|a backlit keyboard|up to 12 hours of battery life|a fingerprint reader|"
          "Wi-Fi 6 connectivity", variant="memory: 8GB RAM|16GB RAM|32GB RAM"),
    _leaf("Electronics > Computers > Laptop Bags", "Laptop Backpack|Commuter Backpack|Travel Laptop Backpack", 45,
          "a padded laptop compartment|water-resistant fabric|an anti-theft zip pocket|a luggage strap",
          variant="fits: 13-inch|14-inch|15.6-inch", fmt="for {}", attrs="material: Nylon|Polyester|Canvas"),
    _leaf("Electronics > Computers > Computer Mice", "Wireless Mouse|Ergonomic Mouse|Gaming Mouse", 30,
          "a silent click design|an adjustable DPI sensor|a rechargeable battery|Bluetooth and a USB receiver|"
          "a contoured thumb rest"),
    _leaf("Electronics > Headphones", "Wireless Earbuds|True Wireless Earbuds|Noise Cancelling Earbuds", 90,
          "active noise cancellation|30 hours of playback|a built-in microphone|a quick-charge case|deep bass"),
    _leaf("Electronics > Batteries", "AA Batteries|AAA Batteries|Rechargeable AA Batteries", 14,
          "a 10-year shelf life|a leak-proof design|reliable power for toys and remotes",
          variant="pack: 8-Pack|16-Pack|24-Pack", colored=False),
    # Home & Kitchen
    _leaf("Home & Kitchen > Coffee & Tea > Coffee Makers",
          "Drip Coffee Maker|Programmable Coffee Maker|Thermal Coffee Maker", 120,
          "a programmable timer|a pause-and-serve function|a built-in grinder|an auto shut-off|a reusable filter",
          variant="capacity: 4-Cup|10-Cup|12-Cup", attrs="material: Stainless Steel|Glass|BPA-free Plastic"),
    _leaf("Home & Kitchen > Coffee & Tea > Mugs", "Coffee Mug|Travel Mug|Mug Set", 18,
          "a comfortable handle|a chip-resistant glaze|microwave safety|a generous size",
          variant="capacity: 12oz|16oz|20oz", attrs="material: Ceramic|Stoneware|Porcelain"),
    _leaf("Home & Kitchen > Coffee & Tea > Electric Kettles", "Electric Kettle|Gooseneck Kettle", 45,
          "a rapid boil|variable temperature control|a keep-warm function|boil-dry protection",
          variant="capacity: 1.0L|1.7L", attrs="material: Stainless Steel|Glass"),
    _leaf("Home & Kitchen > Cookware > Frying Pans",
          "Non-Stick Frying Pan|Frying Pan|Skillet", 40,
          "an even-heating base|a stay-cool handle|oven safety up to 260C|induction compatibility",
          variant="size: 20cm|24cm|28cm"),
    _leaf("Home & Kitchen > Cookware > Cooking Utensils",
          "Silicone Utensil Set|Silicone Spatula Set|Kitchen Utensil Set",
          22, "heat-resistant silicone heads|a hanging loop|a non-scratch design|a matching holder",
          variant="pack: 5-Piece|8-Piece|12-Piece"),
    _leaf("Home & Kitchen > Bakeware", "Baking Sheet|Muffin Pan|Springform Pan|Loaf Pan", 20,
          "a non-stick coating|heavy-gauge steel|rolled edges that resist warping|easy release"),
    _leaf("Home & Kitchen > Bedding", "Sheet Set|Deep Pocket Sheet Set|Bed Sheet Set", 55,
          "breathable fabric|deep pockets|a soft sateen weave|two matching pillowcases",
          variant="size: Twin|Queen|King", attrs="material: Cotton|Linen|Microfiber|Bamboo"),
    _leaf("Home & Kitchen > Storage & Organization", "Storage Bins|Stackable Storage Bins|Fabric Storage Cubes", 28,
          "a stackable design|sturdy handles|a foldable construction|a label window",
          variant="pack: Set of 3|Set of 6"),
    # Sports & Outdoors
    _leaf("Sports & Outdoors > Running > Running Shoes", "Running Shoes|Trail Running Shoes|Road Running Shoes", 95,
          "a responsive foam midsole|a breathable mesh upper|a grippy rubber outsole|a reflective heel tab",
          variant="size: US 7|US 8|US 9|US 10|US 11"),
    _leaf("Sports & Outdoors > Running > Athletic Socks", "Running Socks|Athletic Socks|Compression Socks", 14,
          "moisture-wicking yarn|arch support|a seamless toe|cushioned heels", variant="pack: 3-Pack|6-Pack",
          attrs="size: S|M|L"),
    _leaf("Sports & Outdoors > Yoga & Fitness > Yoga Mats", "Yoga Mat|Travel Yoga Mat|Thick Exercise Mat", 35,
          "a non-slip textured surface|extra cushioning for joints|a carrying strap|alignment lines",
          variant="thickness: 4mm|6mm|8mm", attrs="material: TPE|Natural Rubber|PVC"),
    _leaf("Sports & Outdoors > Yoga & Fitness > Yoga Blocks & Straps",
          "Yoga Block Set|Yoga Block Pair|Yoga Block and Strap Kit", 18,
          "high-density foam|rounded edges|a non-slip surface|a lightweight build", attrs="material: Foam|Cork|Cotton"),
    _leaf("Sports & Outdoors > Yoga & Fitness > Dumbbells", "Dumbbell Pair|Hex Dumbbell Pair|Rubber Dumbbell Pair", 60,
          "a knurled grip|a hex shape that won't roll|a rubber coating that protects floors|a chrome handle",
          variant="weight: 5kg|10kg|20kg"),
    _leaf("Sports & Outdoors > Camping & Hiking > Tents", "Dome Tent|Backpacking Tent|Family Tent", 160,
          "a full rainfly|quick-pitch color-coded poles|mesh ventilation panels|two vestibules",
          variant="capacity: 2-Person|4-Person|6-Person"),
    _leaf("Sports & Outdoors > Camping & Hiking > Sleeping Bags", "Mummy Sleeping Bag|Sleeping Bag|Down Sleeping Bag",
          70, "a comfort rating down to -5C|a draft collar|a compression sack|a two-way zip",
          variant="season: 3-Season|4-Season"),
    _leaf("Sports & Outdoors > Camping & Hiking > Camping Lanterns",
          "LED Camping Lantern|Rechargeable Lantern|Headlamp", 25,
          "up to 1000 lumens|a USB-C rechargeable battery|a water-resistant body|a red night mode"),
    _leaf("Sports & Outdoors > Water Bottles",
          "Insulated Water Bottle|Stainless Steel Water Bottle|Sports Water Bottle", 22,
          "double-wall vacuum insulation|a leak-proof lid|a wide mouth for ice|BPA-free materials",
          variant="capacity: 500ml|750ml|1L"),
    _leaf("Sports & Outdoors > Cycling > Bike Helmets", "Bike Helmet|Road Bike Helmet|Mountain Bike Helmet", 65,
          "in-mold construction|an adjustable dial fit|14 ventilation channels|a removable visor",
          variant=_SIZES, fmt="Size {}"),
    _leaf("Sports & Outdoors > Cycling > Bike Lights", "Bike Light Set|Rechargeable Bike Light", 28,
          "USB charging|a 300-lumen front light|several flash modes|a tool-free mount"),
    # Beauty
    _leaf("Beauty > Skincare > Cleansers", "Foaming Cleanser|Gel Cleanser|Cleansing Balm", 16,
          "gentle surfactants|niacinamide|a fragrance-free formula|a pH-balanced formula",
          variant="size: 150ml|250ml", attrs=_SKIN, colored=False),
    _leaf("Beauty > Skincare > Moisturizers", "Daily Moisturizer|Night Cream|Gel Moisturizer", 28,
          "hyaluronic acid|ceramides|a non-greasy finish|a lightweight texture", variant="size: 50ml|100ml",
          attrs=_SKIN, colored=False),
    _leaf("Beauty > Skincare > Sunscreen", "Sunscreen Lotion|Mineral Sunscreen|Sunscreen Stick", 18,
          "broad-spectrum protection|80 minutes of water resistance|no white cast|reef-friendly filters",
          variant="spf: SPF 30|SPF 50", colored=False),
    _leaf("Beauty > Makeup > Lipstick", "Matte Lipstick|Liquid Lipstick|Lip Tint", 15,
          "long-wearing color|a creamy texture|vitamin E|a transfer-resistant finish"),
    _leaf("Beauty > Makeup > Mascara", "Volumizing Mascara|Lengthening Mascara|Waterproof Mascara", 13,
          "a curved brush|smudge-proof wear|a buildable formula|easy removal", colored=False),
    _leaf("Beauty > Hair Care > Shampoo", "Shampoo|Clarifying Shampoo|Moisture Shampoo", 12,
          "argan oil|a sulfate-free formula|a fresh citrus scent|color-safe cleansing",
          variant="size: 300ml|500ml|1L", colored=False),
    _leaf("Beauty > Hair Care > Conditioner", "Conditioner|Deep Conditioner|Leave-In Conditioner", 13,
          "shea butter|a silicone-free formula|detangling slip|color-safe care", variant="size: 300ml|500ml|1L",
          colored=False),
    _leaf("Beauty > Hair Care > Hair Dryers", "Hair Dryer|Ionic Hair Dryer|Travel Hair Dryer", 60,
          "ionic technology|three heat settings|a cool shot button|a concentrator nozzle",
          variant="power: 1200W|1800W|2200W"),
    _leaf("Beauty > Fragrance", "Eau de Parfum|Eau de Toilette|Body Mist", 55,
          "notes of bergamot and cedar|a long-lasting trail|a floral heart|a warm vanilla base",
          variant="size: 30ml|50ml|100ml", colored=False),
    # Books: made-up titles, the publisher as brand, an author attribute
    _book("Books > Fiction > Mystery & Thriller", "Mystery Novel|Thriller", 15,
          "a twisty plot|an unreliable narrator|a small-town setting|a relentless detective|a shocking final chapter",
          "Silent|Hidden|Last|Cold|Broken|Quiet|Dark|Lost/Harbor|Witness|Alibi|Orchard|Lighthouse|Confession|"
          "Stranger|Inheritance"),
    _book("Books > Fiction > Science Fiction & Fantasy", "Science Fiction Novel|Fantasy Novel", 16,
          "a sprawling galactic empire|an ancient magic system|a found family|a reluctant hero|first contact",
          "Iron|Shattered|Crimson|Endless|Burning|Starlit|Forgotten/Sky|Throne|Star|Crown|Dragon|Frontier|Empire|"
          "Gate"),
    _book("Books > Fiction > Romance", "Romance Novel|Romantic Comedy", 13,
          "an enemies-to-lovers arc|a seaside town|a fake dating scheme|a second-chance romance",
          "Summer|Sweet|Secret|Wild|Perfect|Little/Promise|Bakery|Wedding|Season|Letter|Heart|Vineyard"),
    _book("Books > Cookbooks", "Cookbook", 25,
          "over 100 recipes|step-by-step photographs|quick weeknight dinners|plant-based ideas|baking basics",
          "Simple|Rustic|Weeknight|Sunday|Green|Modern|Everyday/Kitchen|Table|Suppers|Bread|Pantry|Skillet|Bowl"),
    _book("Books > Children's Books", "Picture Book|Children's Book", 10,
          "bright illustrations|a bedtime rhyme|lift-the-flap pages|a gentle lesson about sharing",
          "Sleepy|Brave|Little|Busy|Curious|Happy/Fox|Bear|Rabbit|Dragon|Moon|Tractor|Penguin"),
    _book("Books > Business & Money", "Business Book|Personal Finance Guide", 20,
          "practical frameworks|real-world case studies|clear action steps|research-backed advice",
          "Lean|Deep|Radical|Quiet|Simple|Compound/Leadership|Focus|Growth|Strategy|Habit|Wealth|Negotiation"),
    _leaf("Books > Reading Accessories", "Book Light|Clip-On Reading Light|Rechargeable Book Light", 14,
          "a clip-on design|warm and cool light modes|a rechargeable battery|a flexible neck"),
    # Toys & Games
    _leaf("Toys & Games > Building Sets", "Building Block Set|Construction Kit|Brick Building Set", 45,
          "hundreds of pieces|step-by-step instructions|compatibility with major brands|a storage box",
          variant="pieces: 250 Pieces|500 Pieces|1000 Pieces", attrs=_AGES),
    _leaf("Toys & Games > Board Games", "Strategy Board Game|Family Board Game|Party Game", 32,
          "room for 2-6 players|30-60 minute rounds|easy-to-learn rules|high replay value", attrs=_AGES,
          colored=False),
    _leaf("Toys & Games > Puzzles", "Jigsaw Puzzle|Landscape Jigsaw Puzzle|Panorama Jigsaw Puzzle", 20,
          "precision-cut pieces|a glare-free finish|a poster guide|thick recycled board",
          variant="pieces: 500 Pieces|1000 Pieces|2000 Pieces", colored=False),
    _leaf("Toys & Games > RC Vehicles", "RC Car|RC Monster Truck|RC Rock Crawler", 55,
          "2.4GHz remote control|all-terrain tires|speeds up to 30km/h|a shock-absorbing chassis", attrs=_AGES),
    _leaf("Toys & Games > Dolls & Action Figures", "Action Figure|Collectible Figure|Hero Figure Set", 22,
          "poseable joints|interchangeable accessories|detailed paintwork|collectible packaging", attrs=_AGES),
    # Office Products
    _leaf("Office Products > Printers & Ink > Printers", "Inkjet Printer|Laser Printer|All-in-One Printer", 180,
          "wireless printing|automatic duplex printing|a 250-sheet tray|mobile app support", colored=False),
    _leaf("Office Products > Printers & Ink > Ink & Toner", "Ink Cartridge Pack|Ink Cartridge|Ink Multipack", 38,
          "sharp text|vivid color output|up to 2,000 pages|easy installation",
          variant="yield: Standard Yield|High Yield", colored=False),
    _leaf("Office Products > Printers & Ink > Printer Paper", "Copy Paper|Multipurpose Paper|Printer Paper", 12,
          "bright white sheets|jam-free performance|acid-free stock|a smooth finish",
          variant="pack: 500 Sheets|2500 Sheets", colored=False),
    _leaf("Office Products > Desk Supplies > Notebooks", "Hardcover Notebook|Spiral Notebook|Dotted Journal", 12,
          "100gsm paper|lay-flat binding|an elastic closure|a ribbon bookmark", variant="size: A5|A4|B5"),
    _leaf("Office Products > Desk Supplies > Pens", "Gel Pen Set|Gel Pens|Rollerball Pens", 12,
          "smooth quick-drying ink|a comfortable grip|a refillable design|fine 0.5mm tips",
          variant="pack: 4-Pack|12-Pack|24-Pack"),
    _leaf("Office Products > Office Furniture > Desks", "Standing Desk|Writing Desk|Computer Desk", 260,
          "electric height adjustment|cable management|a scratch-resistant top|a sturdy steel frame",
          variant="width: 100cm|120cm|140cm", attrs="material: Oak Veneer|Walnut|Bamboo|Laminate", colored=False),
    _leaf("Office Products > Office Furniture > Office Chairs",
          "Ergonomic Office Chair|Mesh Office Chair|Executive Chair", 190,
          "adjustable lumbar support|breathable mesh|4D armrests|a tilt lock", attrs="material: Mesh|Leather|Fabric"),
    _leaf("Office Products > Office Furniture > Desk Lamps", "LED Desk Lamp|Architect Desk Lamp", 35,
          "adjustable color temperature|a USB charging port|a flexible arm|touch dimming"),
    # Garden & Outdoor
    _leaf("Garden & Outdoor > Gardening > Plant Seeds", "Vegetable Seed Kit|Herb Seed Kit|Heirloom Seed Collection", 9,
          "non-GMO seeds|high germination rates|a planting guide|heirloom varieties",
          variant="pack: 10 Packets|25 Packets", colored=False),
    _leaf("Garden & Outdoor > Gardening > Planters & Pots", "Planter|Plant Pot|Indoor Planter", 25,
          "drainage holes|a matching saucer|a UV-resistant finish|a self-watering reservoir",
          variant="size: 15cm|25cm|35cm", attrs="material: Ceramic|Terracotta|Recycled Plastic"),
    _leaf("Garden & Outdoor > Gardening > Potting Soil", "Potting Mix|Seed Starting Mix|Organic Potting Soil", 15,
          "added perlite for drainage|slow-release nutrients|peat-free compost|feeding for up to 6 months",
          variant="bag: 10L|25L|50L", colored=False),
    _leaf("Garden & Outdoor > Garden Tools", "Pruning Shears|Garden Tool Set|Hand Trowel Set", 28,
          "hardened steel blades|ergonomic grips|a rust-resistant coating|a lifetime warranty"),
    _leaf("Garden & Outdoor > Outdoor Lighting", "Solar Path Lights|Solar Garden Lights|Solar Stake Lights", 32,
          "solar charging|an IP65 waterproof rating|warm white LEDs|automatic switch-on at dusk",
          variant="pack: 4-Pack|8-Pack"),
    _leaf("Garden & Outdoor > Grills & Outdoor Cooking > Grills", "Gas Grill|Charcoal Grill|Portable Grill", 280,
          "cast iron grates|a built-in thermometer|side shelves|an ash catcher"),
    _leaf("Garden & Outdoor > Grills & Outdoor Cooking > Grill Accessories",
          "Grill Tool Set|BBQ Utensil Set|Grilling Tool Kit", 25,
          "stainless steel tools|long heat-safe handles|a grill brush|a storage case"),
    # Pet Supplies
    _leaf("Pet Supplies > Dogs > Dog Food", "Dry Dog Food|Grain-Free Dog Food|Puppy Food", 45,
          "real chicken as the first ingredient|added omega fatty acids|no artificial preservatives|"
          "a recipe for sensitive stomachs", variant="bag: 2kg|6kg|12kg", colored=False),
    _leaf("Pet Supplies > Dogs > Dog Toys", "Chew Toy|Rubber Chew Toy|Treat-Dispensing Toy", 12,
          "tough natural rubber|a treat-dispensing design|a bouncy shape|dishwasher-safe material",
          variant="size: S|M|L", fmt="Size {}"),
    _leaf("Pet Supplies > Dogs > Dog Beds", "Orthopedic Dog Bed|Bolster Dog Bed|Calming Dog Bed", 55,
          "memory foam|a removable washable cover|a non-slip base|raised bolsters", variant=_SIZES, fmt="Size {}"),
    _leaf("Pet Supplies > Dogs > Leashes & Collars", "Dog Harness|No-Pull Harness|Padded Dog Harness", 18,
          "reflective stitching|a padded chest plate|an adjustable fit|a quick-release buckle",
          variant=_SIZES, fmt="Size {}"),
    _leaf("Pet Supplies > Cats > Cat Food", "Dry Cat Food|Indoor Cat Food|Kitten Food", 30,
          "high-protein recipes|taurine for heart health|hairball control|no artificial colors",
          variant="weight: 1.5kg|3kg|7kg", colored=False),
    _leaf("Pet Supplies > Cats > Cat Litter", "Clumping Cat Litter|Crystal Cat Litter|Natural Cat Litter", 20,
          "odor control|low dust|fast clumping|a lightweight formula", variant="weight: 5kg|10kg|15kg",
          colored=False),
    _leaf("Pet Supplies > Cats > Litter Boxes", "Covered Litter Box|Hooded Litter Box|Top-Entry Litter Box", 40,
          "a carbon filter|a swing door|high sides that reduce scatter|an easy-clean liner"),
    _leaf("Pet Supplies > Cats > Cat Trees", "Cat Tree|Cat Tower|Cat Activity Center", 65,
          "sisal-wrapped posts|a cozy condo|plush perches|a sturdy base"),
    _leaf("Pet Supplies > Fish & Aquatic", "Aquarium Kit|Aquarium Starter Kit|Nano Aquarium", 40,
          "a quiet pump|LED lighting|three-stage filtration|a glass tank", colored=False),
    # Grocery
    _leaf("Grocery > Coffee, Tea & Cocoa > Coffee Beans", "Whole Bean Coffee|Ground Coffee|Espresso Beans", 14,
          "single-origin Arabica beans|notes of chocolate and cherry|small-batch roasting|a resealable valve bag",
          variant="weight: 250g|500g|1kg", attrs="roast: Light|Medium|Dark", colored=False),
    _leaf("Grocery > Coffee, Tea & Cocoa > Tea", "Green Tea|Black Tea|Herbal Tea", 8,
          "whole-leaf tea|biodegradable tea bags|a smooth finish|sustainably grown leaves",
          variant="pack: 20 Bags|50 Bags|100 Bags", colored=False),
    _leaf("Grocery > Pasta & Sauces > Pasta", "Spaghetti|Penne|Fusilli|Rigatoni", 4,
          "bronze-die cutting|durum wheat semolina|slow drying|a rough texture that holds sauce",
          variant="weight: 500g|1kg|Pack of 4", colored=False),
    _leaf("Grocery > Pasta & Sauces > Pasta Sauce", "Marinara Sauce|Tomato Basil Sauce|Arrabbiata Sauce", 6,
          "vine-ripened tomatoes|extra virgin olive oil|fresh basil|no added sugar", variant="size: 350g|680g",
          colored=False),
    _leaf("Grocery > Snacks", "Mixed Nuts|Trail Mix|Roasted Almonds", 9,
          "a light sprinkle of sea salt|slow roasting|no artificial flavors|resealable bags",
          variant="pack: Pack of 6|Pack of 12", colored=False),
    _leaf("Grocery > Honey & Spreads", "Raw Honey|Wildflower Honey|Manuka Honey", 9,
          "no added sugar|a smooth golden texture|a squeezable bottle|hives from local beekeepers",
          variant="size: 250g|500g", colored=False),
    _leaf("Grocery > Baking Supplies", "All-Purpose Flour|Bread Flour|Cake Flour", 7,
          "unbleached wheat|a fine milling|a consistent rise|a resealable bag", variant="weight: 1kg|2kg|5kg",
          colored=False),
    # Fashion
    _leaf("Fashion > Men's Clothing > Men's Shirts", "Oxford Shirt|Button-Down Shirt|Casual Shirt", 35,
          "a button-down collar|breathable fabric|a tailored fit|reinforced seams", variant=_SIZES, fmt="Size {}",
          attrs="material: Cotton|Linen|Cotton Blend"),
    _leaf("Fashion > Men's Clothing > Jeans", "Slim Jeans|Straight Jeans|Relaxed Jeans", 50,
          "stretch denim|a five-pocket design|a mid-rise waist|a classic wash", variant="waist: W30|W32|W34|W36"),
    _leaf("Fashion > Women's Clothing > Dresses", "Wrap Dress|Midi Dress|Maxi Dress", 55,
          "a flattering silhouette|side pockets|a flowy skirt|a tie waist",
          variant="size: XS|S|M|L|XL", fmt="Size {}",
          attrs="material: Viscose|Cotton|Linen|Chiffon"),
    _leaf("Fashion > Women's Clothing > Women's Tops", "Blouse|Knit Top|Tunic Top", 30,
          "a relaxed drape|a soft hand feel|a scoop neck|a tie front", variant="size: XS|S|M|L|XL", fmt="Size {}",
          attrs="material: Viscose|Cotton|Modal"),
    _leaf("Fashion > Accessories > Belts", "Leather Belt|Reversible Belt|Dress Belt", 28,
          "a brushed metal buckle|full-grain leather|a reversible design|an adjustable fit",
          variant=_SIZES, fmt="Size {}"),
    _leaf("Fashion > Accessories > Handbags", "Tote Bag|Crossbody Bag|Shoulder Bag", 70,
          "an adjustable strap|interior zip pockets|a magnetic closure|a structured shape"),
    _leaf("Fashion > Accessories > Sunglasses", "Polarized Sunglasses|Aviator Sunglasses|Round Sunglasses", 40,
          "UV400 protection|polarized lenses|a lightweight frame|a protective case"),
    _leaf("Fashion > Shoes > Sneakers", "Sneakers|Low-Top Sneakers|Leather Sneakers", 70,
          "a cushioned insole|a rubber cupsole|a padded collar|a minimalist silhouette",
          variant="size: US 6|US 7|US 8|US 9|US 10|US 11"),
    _leaf("Fashion > Shoes > Boots", "Chelsea Boots|Ankle Boots|Leather Chelsea Boots", 110,
          "a water-resistant leather upper|elastic side panels|a lug sole|a pull tab",
          variant="size: US 6|US 7|US 8|US 9|US 10|US 11"),
    # Baby
    _leaf("Baby > Nursery > Cribs", "Convertible Crib|4-in-1 Convertible Crib|Crib", 260,
          "three mattress heights|solid pine wood|a non-toxic finish|conversion to a toddler bed"),
    _leaf("Baby > Nursery > Crib Mattresses", "Crib Mattress|Organic Crib Mattress", 120,
          "a waterproof cover|firm breathable support|a dual-sided design|certified foam", colored=False),
    _leaf("Baby > Nursery > Crib Sheets", "Fitted Crib Sheet|Crib Sheet Set|Jersey Crib Sheet", 20,
          "soft breathable cotton|elastic all around|a snug fit|pre-washed softness", variant="pack: 2-Pack|3-Pack"),
    _leaf("Baby > Feeding > Baby Bottles", "Anti-Colic Baby Bottle Set|Glass Baby Bottles", 25,
          "anti-colic vents|slow-flow nipples|BPA-free materials|a wide neck for easy cleaning",
          variant="size: 150ml|260ml"),
    _leaf("Baby > Feeding > Bibs", "Silicone Bibs|Baby Bibs|Feeding Bibs", 12,
          "a food-catching pocket|waterproof silicone|an adjustable neck", variant="pack: 2-Pack|4-Pack"),
    _leaf("Baby > Diapering > Diapers", "Diapers|Overnight Diapers|Sensitive Diapers", 30,
          "a wetness indicator|12-hour leak protection|a soft breathable liner|a snug fit",
          variant="size: Size 1|Size 2|Size 3|Size 4", colored=False),
    _leaf("Baby > Diapering > Baby Wipes", "Baby Wipes|Sensitive Baby Wipes|Water Wipes", 15,
          "99% water|no added fragrance|plant-based fibers|a resealable pack", variant="pack: Pack of 6|Pack of 12",
          colored=False),
    _leaf("Baby > Strollers", "Lightweight Stroller|Compact Stroller|Travel Stroller", 260,
          "a one-hand fold|all-wheel suspension|a large storage basket|a reversible seat"),
    # Automotive
    _leaf("Automotive > Maintenance > Motor Oil", "Synthetic Motor Oil|High Mileage Motor Oil", 32,
          "full synthetic protection|cleaner engine parts|cold start protection|fewer deposits",
          variant="viscosity: 5W-30|0W-20|10W-40", colored=False),
    _leaf("Automotive > Maintenance > Oil Filters", "Oil Filter|Extended Life Oil Filter", 10,
          "synthetic blend media|an anti-drain back valve|a high dirt-holding capacity", colored=False),
    _leaf("Automotive > Car Care > Car Wash Soap", "Car Wash Soap|Car Shampoo|Wash and Wax", 12,
          "a pH-neutral formula|thick suds|safety on all finishes|a streak-free rinse",
          variant="size: 500ml|1L|3.8L", colored=False),
    _leaf("Automotive > Car Care > Microfiber Towels",
          "Microfiber Towels|Microfiber Drying Towels|Detailing Cloths", 15,
          "a plush 400gsm weave|lint-free drying|an edgeless design|machine washability",
          variant="pack: 6-Pack|12-Pack|24-Pack"),
    _leaf("Automotive > Car Electronics > Dash Cams", "Dash Cam|Front and Rear Dash Cam", 90,
          "1440p recording|night vision|a G-sensor|loop recording|a parking mode", colored=False),
    _leaf("Automotive > Car Electronics > Car Phone Mounts",
          "Magnetic Phone Mount|Vent Phone Mount|Dashboard Phone Holder", 20,
          "one-hand operation|a strong magnet|360-degree rotation|a secure grip"),
    _leaf("Automotive > Tire Inflators", "Portable Tire Inflator|Tire Inflator|Cordless Tire Inflator", 45,
          "an auto shut-off|a digital display|a built-in LED light|a 12V plug", colored=False),
    # Health & Household
    _leaf("Health & Household > Vitamins & Supplements > Multivitamins",
          "Daily Multivitamin|Multivitamin|Women's Multivitamin|Men's Multivitamin", 18,
          "one-a-day dosing|third-party testing|easy-to-swallow tablets|no artificial colors",
          variant="count: 60 Count|120 Count|240 Count", colored=False),
    _leaf("Health & Household > Vitamins & Supplements > Protein Powder", "Whey Protein Powder|Plant Protein Powder",
          40, "25g of protein per serving|added BCAAs|easy mixing|no added sugar",
          variant="flavor: Chocolate|Vanilla|Unflavored", attrs="weight: 1kg|2kg", colored=False),
    _leaf("Health & Household > Medical Supplies > Blood Pressure Monitors",
          "Upper Arm Blood Pressure Monitor|Wrist Blood Pressure Monitor", 50,
          "irregular heartbeat detection|memory for two users|a large backlit display|a wide-range cuff",
          colored=False),
    _leaf("Health & Household > Medical Supplies > Thermometers",
          "Digital Thermometer|Forehead Thermometer|Ear Thermometer", 20,
          "one-second readings|a fever alarm|memory for 30 readings|a flexible tip", colored=False),
    _leaf("Health & Household > Medical Supplies > First Aid Kits", "First Aid Kit|Travel First Aid Kit", 25,
          "over 100 pieces|a compact carry case|sterile dressings|an emergency guide", colored=False),
    _leaf("Health & Household > Oral Care > Electric Toothbrushes", "Electric Toothbrush|Sonic Toothbrush", 60,
          "a 2-minute timer|pressure sensing|three cleaning modes|a travel case"),
    _leaf("Health & Household > Oral Care > Toothbrush Heads", "Replacement Brush Heads|Sensitive Brush Heads", 18,
          "soft tapered bristles|fade-indicator bristles|a universal fit", variant="pack: 4-Pack|8-Pack",
          colored=False),
    # Musical Instruments
    _leaf("Musical Instruments > Guitars > Acoustic Guitars",
          "Acoustic Guitar|Dreadnought Acoustic Guitar|Concert Acoustic Guitar", 250,
          "a solid spruce top|a slim neck profile|a built-in tuner|a rosewood fretboard",
          variant="size: 3/4 Size|Full Size"),
    _leaf("Musical Instruments > Guitars > Electric Guitars", "Electric Guitar|Solid-Body Electric Guitar", 420,
          "dual humbucker pickups|a maple neck|a tremolo bridge|locking tuners"),
    _leaf("Musical Instruments > Guitar Accessories > Guitar Strings",
          "Acoustic Guitar Strings|Phosphor Bronze Strings|80/20 Bronze Strings", 10,
          "a long-life coating|a bright balanced tone|corrosion resistance", variant="gauge: Extra Light|Light|Medium",
          colored=False),
    _leaf("Musical Instruments > Guitar Accessories > Guitar Tuners", "Clip-On Tuner|Pedal Tuner", 18,
          "fast accurate tuning|a bright color display|a chromatic mode"),
    _leaf("Musical Instruments > Guitar Accessories > Amplifiers", "Guitar Amplifier|Practice Amp|Combo Amp", 150,
          "built-in effects|a headphone output|a 10-inch speaker|Bluetooth playback", variant="power: 10W|20W|50W",
          colored=False),
    _leaf("Musical Instruments > Keyboards & Pianos > Digital Pianos",
          "Digital Piano|Stage Piano|Home Digital Piano", 380,
          "88 weighted keys|built-in lessons|a sustain pedal input|hundreds of voices",
          variant="keys: 61 Keys|88 Keys"),
    _leaf("Musical Instruments > Keyboards & Pianos > Keyboard Stands",
          "Keyboard Stand|X-Style Keyboard Stand|Z-Style Keyboard Stand", 40,
          "an adjustable height|a sturdy frame|rubber end caps|a fold-flat design"),
    _leaf("Musical Instruments > Drums & Percussion", "Electronic Drum Kit|Electronic Drum Set|Compact Drum Kit", 220,
          "mesh heads|a built-in metronome|dozens of kits|a quiet practice mode"),
    # Video Games
    _leaf("Video Games > Consoles", "Game Console|Handheld Console", 420,
          "4K HDR gaming|a 1TB SSD|backwards compatibility|online multiplayer",
          variant="edition: Standard|Digital Edition|Bundle"),
    _leaf("Video Games > Controllers", "Wireless Controller|Pro Controller|Gamepad", 60,
          "haptic feedback|a rechargeable battery|remappable buttons|low-latency wireless"),
    _game("Video Games > Games > Action & Adventure", "Action-Adventure Game", 50,
          "Shadow|Iron|Fallen|Neon|Savage|Silent/Realm|Legion|Frontier|Citadel|Outlaw|Horizon"),
    _game("Video Games > Games > Sports & Racing", "Racing Game|Sports Game", 45,
          "Turbo|Ultimate|Street|Pro|Grand|Full/Drift|Circuit|League|Rally|Slam|Speedway"),
    _game("Video Games > Games > Role-Playing", "Role-Playing Game", 55,
          "Eternal|Ashen|Crystal|Elder|Hollow|Wandering/Kingdom|Saga|Oath|Covenant|Relic|Chronicle"),
    _leaf("Video Games > Gaming Headsets", "Gaming Headset|Wireless Gaming Headset", 80,
          "7.1 surround sound|a detachable mic|memory foam ear cushions|RGB lighting"),
    # Tools & Home Improvement
    _leaf("Tools & Home Improvement > Power Tools > Power Drills", "Cordless Drill|Drill Driver|Hammer Drill", 110,
          "a brushless motor|two 2.0Ah batteries|a 2-speed gearbox|an LED work light",
          variant="voltage: 12V|18V|20V", colored=False),
    _leaf("Tools & Home Improvement > Power Tools > Power Saws",
          "Circular Saw|Cordless Circular Saw|Compact Circular Saw", 130,
          "a laser guide|bevel adjustment|dust extraction|an electric brake", colored=False),
    _leaf("Tools & Home Improvement > Tool Accessories > Drill Bits",
          "Drill Bit Set|Twist Drill Bit Set|Multi-Material Drill Bits", 22,
          "a titanium coating|a hex shank|a labeled case", variant="pack: 15-Piece|50-Piece|100-Piece",
          colored=False),
    _leaf("Tools & Home Improvement > Tool Accessories > Saw Blades",
          "Circular Saw Blade|Framing Saw Blade|Fine-Finish Saw Blade", 25,
          "carbide-tipped teeth|clean cuts in hardwood|anti-vibration slots", colored=False),
    _leaf("Tools & Home Improvement > Hand Tools", "Screwdriver Set|Precision Screwdriver Set|Socket Set", 25,
          "chrome vanadium steel|cushioned grips|a lifetime warranty|magnetic tips", colored=False),
    _leaf("Tools & Home Improvement > Tool Storage", "Tool Box|Rolling Tool Box|Stackable Tool Box", 60,
          "a removable tray|heavy-duty latches|reinforced corners|built-in organizers"),
    # Jewelry
    _leaf("Jewelry > Necklaces", "Pendant Necklace|Chain Necklace|Layered Necklace", 60,
          "a delicate cable chain|a hypoallergenic finish|an adjustable length|a lobster clasp", attrs=_METALS,
          colored=False),
    _leaf("Jewelry > Earrings", "Stud Earrings|Hoop Earrings|Drop Earrings", 40,
          "a hypoallergenic finish|secure butterfly backs|a polished shine|a gift box", attrs=_METALS,
          colored=False),
    _leaf("Jewelry > Rings", "Stacking Ring|Band Ring|Eternity Ring", 45,
          "a comfort-fit band|a polished shine|a hypoallergenic finish", variant="size: Size 5|Size 6|Size 7|Size 8",
          attrs=_METALS, colored=False),
    _leaf("Jewelry > Watches > Wristwatches", "Automatic Watch|Chronograph Watch|Minimalist Watch", 150,
          "sapphire crystal|50m water resistance|a Japanese movement|a date window"),
    _leaf("Jewelry > Watches > Watch Bands", "Leather Watch Band|Mesh Watch Band|Silicone Watch Band", 20,
          "quick-release pins|a stainless steel buckle|a soft lining", variant="width: 18mm|20mm|22mm"),
    _leaf("Jewelry > Jewelry Boxes", "Jewelry Box|Travel Jewelry Case", 35,
          "a velvet lining|a built-in mirror|ring rolls|a lockable lid"),
    # Luggage & Travel
    _leaf("Luggage & Travel > Suitcases", "Carry-On Suitcase|Checked Suitcase|Hardside Spinner", 130,
          "360-degree spinner wheels|a TSA-approved lock|an expandable zip|a polycarbonate shell",
          variant="size: Small|Medium|Large"),
    _leaf("Luggage & Travel > Backpacks", "Travel Backpack|Carry-On Backpack|Weekender Backpack", 65,
          "a padded laptop sleeve|water-resistant fabric|a hip belt|a clamshell opening",
          variant="capacity: 20L|30L|40L"),
    _leaf("Luggage & Travel > Travel Accessories > Packing Cubes", "Packing Cube Set|Compression Packing Cubes", 25,
          "mesh tops|double zips|a bonus laundry bag", variant="pack: Set of 4|Set of 6"),
    _leaf("Luggage & Travel > Travel Accessories > Travel Pillows",
          "Memory Foam Travel Pillow|Travel Neck Pillow", 22, "memory foam|a washable cover|a matching eye mask"),
    _leaf("Luggage & Travel > Travel Accessories > Luggage Tags",
          "Luggage Tags|Leather Luggage Tags|Silicone Luggage Tags", 9,
          "a privacy flap|a steel loop|a bright color that is easy to spot", variant="pack: 2-Pack|4-Pack"),
    # Arts & Crafts
    _leaf("Arts & Crafts > Painting > Acrylic Paints", "Acrylic Paint Set|Heavy Body Acrylics", 22,
          "rich pigments|fast drying|a non-toxic formula|mixable colors",
          variant="pack: 12 Colors|24 Colors|48 Colors", colored=False),
    _leaf("Arts & Crafts > Painting > Paint Brushes", "Paint Brush Set|Acrylic Brush Set|Detail Brush Set", 15,
          "synthetic bristles|wooden handles|a roll-up case", variant="pack: 10-Piece|15-Piece", colored=False),
    _leaf("Arts & Crafts > Painting > Canvases", "Stretched Canvas|Canvas Panels", 25,
          "primed cotton|a triple gesso coat|solid wood frames", variant="size: 20x25cm|30x40cm|50x70cm",
          colored=False),
    _leaf("Arts & Crafts > Painting > Easels", "Tabletop Easel|Studio Easel|Field Easel", 60,
          "an adjustable height|beech wood|a storage drawer", colored=False),
    _leaf("Arts & Crafts > Drawing > Sketchbooks", "Sketchbook|Mixed Media Sketchbook", 14,
          "heavyweight paper|acid-free pages|a spiral binding", variant="size: A5|A4|A3"),
    _leaf("Arts & Crafts > Drawing > Colored Pencils", "Colored Pencil Set|Watercolor Pencils", 20,
          "soft blendable cores|break-resistant leads|a tin case", variant="pack: 24 Colors|48 Colors|72 Colors",
          colored=False),
    _leaf("Arts & Crafts > Sewing > Sewing Machines", "Sewing Machine|Computerized Sewing Machine", 180,
          "60 built-in stitches|an automatic needle threader|a free arm|an LED work light"),
    _leaf("Arts & Crafts > Sewing > Fabric", "Quilting Fabric Bundle|Fat Quarter Bundle|Precut Fabric Bundle", 20,
          "100% cotton|pre-cut fat quarters|a colorfast print"),
    _leaf("Arts & Crafts > Knitting & Crochet > Yarn", "Merino Yarn|Merino Wool Yarn|Chunky Merino Yarn", 12,
          "soft merino wool|machine washability|100g skeins", variant="pack: Pack of 3|Pack of 6"),
    _leaf("Arts & Crafts > Knitting & Crochet > Knitting Needles", "Knitting Needle Set|Crochet Hook Set", 20,
          "smooth bamboo|ergonomic handles|a zip case", colored=False),
)  # fmt: skip

# Chains of complementary subcategories (leaf names): each link a -> b means "after buying an a, people look for a b".
_COMPLEMENT_CHAINS: tuple[tuple[str, ...], ...] = (
    ("Smartphones", "Phone Cases", "Chargers & Cables"),
    ("Smartphones", "Car Phone Mounts"),
    ("Cameras", "Memory Cards", "Tripods"),
    ("Laptops", "Laptop Bags", "Computer Mice"),
    ("Dash Cams", "Memory Cards"),
    ("Coffee Makers", "Coffee Beans", "Mugs"),
    ("Electric Kettles", "Tea", "Honey & Spreads"),
    ("Frying Pans", "Cooking Utensils"),
    ("Cookbooks", "Bakeware", "Baking Supplies"),
    ("Running Shoes", "Athletic Socks", "Water Bottles"),
    ("Protein Powder", "Water Bottles"),
    ("Yoga Mats", "Yoga Blocks & Straps"),
    ("Tents", "Sleeping Bags", "Camping Lanterns"),
    ("Bike Helmets", "Bike Lights"),
    ("Cleansers", "Moisturizers", "Sunscreen"),
    ("Shampoo", "Conditioner"),
    ("Mystery & Thriller", "Reading Accessories"),
    ("RC Vehicles", "Batteries"),
    ("Printers", "Ink & Toner", "Printer Paper"),
    ("Notebooks", "Pens"),
    ("Desks", "Office Chairs", "Desk Lamps"),
    ("Plant Seeds", "Planters & Pots", "Potting Soil"),
    ("Grills", "Grill Accessories"),
    ("Dog Food", "Dog Toys", "Dog Beds"),
    ("Cat Food", "Cat Litter", "Litter Boxes"),
    ("Pasta", "Pasta Sauce"),
    ("Jeans", "Belts"),
    ("Dresses", "Handbags"),
    ("Cribs", "Crib Mattresses", "Crib Sheets"),
    ("Diapers", "Baby Wipes"),
    ("Baby Bottles", "Bibs"),
    ("Motor Oil", "Oil Filters"),
    ("Car Wash Soap", "Microfiber Towels"),
    ("Electric Toothbrushes", "Toothbrush Heads"),
    ("Acoustic Guitars", "Guitar Strings", "Guitar Tuners"),
    ("Electric Guitars", "Amplifiers"),
    ("Digital Pianos", "Keyboard Stands"),
    ("Consoles", "Controllers", "Action & Adventure"),
    ("Controllers", "Sports & Racing"),
    ("Power Drills", "Drill Bits", "Tool Storage"),
    ("Power Saws", "Saw Blades"),
    ("Wristwatches", "Watch Bands"),
    ("Necklaces", "Jewelry Boxes"),
    ("Suitcases", "Packing Cubes", "Luggage Tags"),
    ("Backpacks", "Travel Pillows"),
    ("Acrylic Paints", "Paint Brushes", "Canvases", "Easels"),
    ("Colored Pencils", "Sketchbooks"),
    ("Sewing Machines", "Fabric"),
    ("Yarn", "Knitting Needles"),
)

_COLORS = (
    "Black", "White", "Midnight Blue", "Graphite", "Silver", "Rose Gold", "Forest Green", "Crimson", "Sand", "Navy",
    "Charcoal", "Ivory", "Sky Blue", "Olive", "Burgundy", "Blush Pink",
)  # fmt: skip
_FIRST_NAMES = (
    "Ada", "Ben", "Clara", "Dev", "Elena", "Farid", "Grace", "Hugo", "Iris", "Jonah", "Keiko", "Liam", "Maya", "Nadia",
    "Omar", "Priya", "Rosa", "Theo",
)  # fmt: skip
_LAST_NAMES = (
    "Ashford", "Brennan", "Castillo", "Dunmore", "Everly", "Fairbanks", "Greer", "Holloway", "Ibarra", "Kowalski",
    "Lindqvist", "Marsh", "Okafor", "Pryce",
)  # fmt: skip
_MEDIA_TITLES = ("The {a} {n}", "{a} {n}", "The {n} and the {n2}", "{n} of the {a} {n2}", "A {a} {n}")


def _leaf_by_name() -> dict[str, _Leaf]:
    by_name: dict[str, _Leaf] = {}
    for leaf in _LEAVES:
        if leaf.name in by_name:
            raise ValueError(f"leaf subcategory name {leaf.name!r} is used twice; complement chains need unique names")
        by_name[leaf.name] = leaf
    return by_name


_LEAF_BY_NAME = _leaf_by_name()

# --------------------------------------------------------------------------------------------------------------------
# Config and result
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticConfig:
    """How big the synthetic shop is and how its users behave. Every default is the demo's dataset."""

    seed: int = 0  # the only source of randomness: same config -> byte-identical data
    n_items: int = 2400  # catalog size, cold items included
    n_users: int = 800
    n_categories: int = 20  # top-level categories used, taken in a fixed order (at most 20)
    sessions_per_user: tuple[int, int] = (3, 10)  # inclusive range for regular users; ~4-5 events per session
    short_user_fraction: float = 0.12  # users with a single 2-4 event session (cold-ish users)
    new_item_fraction: float = 0.05  # items created in the last `new_item_days` with no interactions (cold start)
    new_item_days: int = 14
    out_of_stock_fraction: float = 0.03
    complement_prob: float = 0.55  # after a purchase, how often the user goes on to a complement subcategory
    start: datetime = datetime(2023, 1, 1, tzinfo=UTC)  # first possible event
    days: int = 730  # length of the event log; the data's "now" is start + days

    def __post_init__(self) -> None:
        if not 1 <= self.n_categories <= MAX_CATEGORIES:
            raise ValueError(f"`n_categories` must be between 1 and {MAX_CATEGORIES}, got {self.n_categories}.")
        n_leaves = sum(1 for leaf in _LEAVES if leaf.path[0] in {t.name for t in _TOPS[: self.n_categories]})
        if self.n_items < n_leaves:
            raise ValueError(
                f"`n_items` must be at least {n_leaves} (one per subcategory of {self.n_categories} categories), "
                f"got {self.n_items}; raise it or lower `n_categories`."
            )
        if self.n_users < 1:
            raise ValueError(f"`n_users` must be at least 1, got {self.n_users}.")
        lo, hi = self.sessions_per_user
        if not 1 <= lo <= hi:
            raise ValueError(f"`sessions_per_user` must be (lo, hi) with 1 <= lo <= hi, got {self.sessions_per_user}.")
        for name in ("short_user_fraction", "new_item_fraction", "out_of_stock_fraction", "complement_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be between 0 and 1, got {value}.")
        if self.new_item_fraction >= 0.5:
            raise ValueError(f"`new_item_fraction` must be below 0.5, got {self.new_item_fraction}.")
        if self.new_item_days < 1:
            raise ValueError(f"`new_item_days` must be at least 1, got {self.new_item_days}.")
        if self.days < 4 * self.new_item_days:
            raise ValueError(f"`days` must be at least 4 * new_item_days = {4 * self.new_item_days}, got {self.days}.")
        if self.start.utcoffset() != timedelta(0):
            raise ValueError(f"`start` must be a UTC datetime (tzinfo=UTC), got {self.start.isoformat()}.")

    @property
    def now(self) -> datetime:
        """The end of the simulated period: cold items are created in the days just before it."""
        return self.start + timedelta(days=self.days)


@dataclass(frozen=True)
class SyntheticData:
    """A generated shop: the catalog, the event log and the ground truth behind them."""

    items: list[Item]  # ordered by id; ids follow creation time, so the newest items have the largest ids
    interactions: list[Interaction]  # grouped by user, each user's events in time order
    complements: dict[str, list[str]]  # leaf path -> leaf paths whose items complement it (' > '-joined)
    cold_item_ids: list[str]  # items created in the last days before `now`, with no interactions
    brand_tiers: dict[str, str]  # brand -> "budget", "mid" or "premium" (prices follow the tier)
    now: datetime  # the end of the simulated period
    config: SyntheticConfig = field(repr=False)

    def summary(self) -> dict[str, object]:
        """Headline counts, for the CLI and the demo."""
        types = Counter(ev.type.value for ev in self.interactions)
        return {
            "items": len(self.items),
            "users": len({ev.user_id for ev in self.interactions}),
            "events": len(self.interactions),
            "events_by_type": {t.value: types.get(t.value, 0) for t in InteractionType if types.get(t.value)},
            "top_categories": len({it.category[0] for it in self.items}),
            "subcategories": len({it.category for it in self.items}),
            "cold_items": len(self.cold_item_ids),
            "out_of_stock": sum(not it.in_stock for it in self.items),
        }


# --------------------------------------------------------------------------------------------------------------------
# Catalog
# --------------------------------------------------------------------------------------------------------------------


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _lower(phrase: str) -> str:
    """Lower-case a title noun for running text, keeping acronyms and model names: 'USB-C Fast Charger' ->
    'USB-C fast charger'."""

    def word(w: str) -> str:
        return "-".join(p.lower() if p[:1].isupper() and p[1:].islower() else p for p in w.split("-"))

    return " ".join(word(w) for w in phrase.split(" "))


def _article(phrase: str) -> str:
    """'a'/'an' for a singular noun phrase, '' for a plural one ('solar path lights')."""
    last = phrase.rsplit(" ", 1)[-1].lower()
    if last.endswith("s") and not last.endswith(("ss", "us", "as", "is")):
        return ""
    if phrase.lower().startswith(("uni", "use")):
        return "a"  # "a universal", "a useful": the vowel is sounded "yu"
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def _with_article(phrase: str) -> str:
    """The phrase with its article, capitalised to start a sentence: 'A slim phone case', 'Solar path lights'."""
    text = f"{_article(phrase)} {phrase}".strip()
    return text[:1].upper() + text[1:]


def _price(rng: np.random.Generator, median: float, tier: int) -> float:
    p = median * _TIER_PRICE[tier] * float(rng.lognormal(0.0, _PRICE_SIGMA))
    if p >= 10:
        return round(round(p) - 0.01, 2)  # charm pricing: 24.99, 449.99
    return round(max(round(p, 1), 0.5) - 0.01, 2)  # 7.49, 0.49


@dataclass
class _Draft:
    """One item before ids are assigned (ids follow creation time, which is decided later)."""

    leaf: int
    title: str
    brand: str
    tier: int
    price: float
    description: str
    attributes: dict[str, str]


def _media_title(rng: np.random.Generator, leaf: _Leaf) -> str:
    adjs, nouns = leaf.words
    n, n2 = (nouns[i] for i in rng.choice(len(nouns), size=2, replace=False))
    return _choice(rng, _MEDIA_TITLES).format(a=_choice(rng, adjs), n=n, n2=n2)


def _draft(rng: np.random.Generator, leaf_idx: int, leaf: _Leaf, top: _Top) -> _Draft:
    """Draw one item of a leaf subcategory: brand and tier, price, title, attributes and description."""
    tier = int(rng.choice(3, p=[0.35, 0.4, 0.25]))
    brand = _choice(rng, top.brands[tier])
    attributes: dict[str, str] = {}
    variant = ""
    if leaf.variant is not None:
        key, values = leaf.variant
        attributes[key] = _choice(rng, values)
        variant = leaf.variant_fmt.format(attributes[key])
    for key, values in leaf.attrs:
        attributes[key] = _choice(rng, values)
    noun = _choice(rng, leaf.nouns)
    f1, f2, f3 = (leaf.features[i] for i in rng.choice(len(leaf.features), size=3, replace=False))

    if leaf.kind == "product":
        adj = _choice(rng, top.adjectives)
        while adj in noun.split():  # no "Daily Daily Moisturizer"
            adj = _choice(rng, top.adjectives)
        title = f"{brand} {adj} {noun}" + (f" {variant}" if variant else "")
        if leaf.colored:
            attributes["color"] = _choice(rng, _COLORS)
            title += f", {attributes['color']}"
        thing = f"{_lower(adj)} {_lower(noun)}"
        first = f"{_with_article(thing)} with {f1} and {f2}."
    else:
        core = _media_title(rng, leaf)
        genre = _lower(noun)
        if leaf.kind == "book":
            attributes["author"] = f"{_choice(rng, _FIRST_NAMES)} {_choice(rng, _LAST_NAMES)}"
            attributes["pages"] = str(int(rng.integers(120, 640)))
            title = f"{core}: {_with_article(noun)} ({variant})"
            first = f"{_with_article(genre)} by {attributes['author']} with {f1} and {f2}."
        else:
            title = f"{core} ({variant}, {attributes['edition']})"
            first = f"{_with_article(genre)} for {variant} with {f1} and {f2}."

    sentences = [first]
    if rng.random() < 0.6:
        material = attributes.get("material")
        sentences.append(f"Made of {_lower(material)}." if material else f"It also offers {f3}.")
    if rng.random() < 0.5:
        sentences.append(
            (
                "Great value for everyday use.",
                f"A dependable pick from {brand}.",
                f"Backed by {brand}'s 2-year warranty.",
            )[tier]
        )
    return _Draft(leaf_idx, title, brand, tier, _price(rng, leaf.price, tier), " ".join(sentences), attributes)


_ROMAN = ("", "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X")


def _unique_title(rng: np.random.Generator, draft: _Draft, leaf: _Leaf, top: _Top, seen: set[str]) -> _Draft:
    """Redraw a few times when a title is taken; then number it like a product line ("... II, Black")."""
    for _ in range(4):
        if draft.title not in seen:
            break
        draft = _draft(rng, draft.leaf, leaf, top)
    head, sep, tail = draft.title.rpartition(", ") if "color" in draft.attributes else (draft.title, "", "")
    k = 2
    while draft.title in seen:
        draft.title = f"{head} {_ROMAN[k] if k < len(_ROMAN) else k}{sep}{tail}"
        k += 1
    seen.add(draft.title)
    return draft


# --------------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _LeafPool:
    """The warm (non-cold) items of one leaf, sorted by creation time, so the items on sale at time t are a prefix."""

    rows: np.ndarray  # indices into the final item list
    created: np.ndarray  # creation time, seconds since config.start
    appeal: np.ndarray  # Zipf-like popularity within the leaf
    tier: np.ndarray
    brand: np.ndarray  # brand index within the top category (0..5)


def generate(config: SyntheticConfig = SyntheticConfig()) -> SyntheticData:
    """Build the synthetic catalog and event log described by `config` (deterministic in `config`)."""
    rng = np.random.default_rng(config.seed)
    tops = _TOPS[: config.n_categories]
    top_names = [t.name for t in tops]
    leaves = [leaf for leaf in _LEAVES if leaf.path[0] in top_names]
    leaf_top = np.array([top_names.index(leaf.path[0]) for leaf in leaves])
    span = config.days * 86400
    cold_window = config.new_item_days * 86400

    # --- catalog: every leaf gets one item, the rest follow leaf popularity (popular leaves are also bigger)
    leaf_pop = rng.gamma(2.0, 1.0, size=len(leaves))
    counts = np.ones(len(leaves), dtype=np.int64) + rng.multinomial(
        config.n_items - len(leaves), leaf_pop / leaf_pop.sum()
    )
    seen: set[str] = set()
    drafts: list[_Draft] = []
    first_of_leaf: list[bool] = []
    for li, leaf in enumerate(leaves):
        top = tops[leaf_top[li]]
        for j in range(int(counts[li])):
            drafts.append(_unique_title(rng, _draft(rng, li, leaf, top), leaf, top, seen))
            first_of_leaf.append(j == 0)

    # Cold items never include a leaf's first item, so every leaf always has something on sale.
    n_cold = min(round(config.new_item_fraction * config.n_items), config.n_items - len(leaves))
    eligible = np.flatnonzero(~np.array(first_of_leaf))
    cold = np.zeros(len(drafts), dtype=bool)
    cold[rng.choice(eligible, size=n_cold, replace=False)] = True
    # Creation times (seconds since start): first items up to 120 days before the log starts, the rest spread over
    # the log (more early on), cold ones in the last `new_item_days`.
    pre = 120 * 86400
    created = np.where(
        np.array(first_of_leaf),
        -rng.integers(0, pre, size=len(drafts)),
        -pre + (rng.beta(1.0, 1.4, size=len(drafts)) * (span - cold_window - 86400 + pre)).astype(np.int64),
    )
    created = np.where(cold, span - rng.integers(0, cold_window, size=len(drafts)), created)
    in_stock = rng.random(len(drafts)) >= config.out_of_stock_fraction

    order = np.lexsort((np.arange(len(drafts)), created))  # ids follow creation time; ties by draft order
    items: list[Item] = []
    row_of_draft = np.empty(len(drafts), dtype=np.int64)
    for row, d in enumerate(order):
        dr = drafts[int(d)]
        row_of_draft[d] = row
        items.append(
            Item(
                id=f"P{row + 1:06d}",
                title=dr.title,
                category=leaves[dr.leaf].path,
                brand=dr.brand,
                price=dr.price,
                description=dr.description,
                attributes=dr.attributes,
                created_at=config.start + timedelta(seconds=int(created[d])),
                in_stock=bool(in_stock[d]),
            )
        )
    cold_rows = sorted(int(row_of_draft[d]) for d in np.flatnonzero(cold))

    brand_index = {b: i for t in tops for i, b in enumerate(b for tier in t.brands for b in tier)}
    pools: list[_LeafPool] = []
    leaf_of_draft = np.array([d.leaf for d in drafts])
    for li in range(len(leaves)):
        ds = np.flatnonzero((leaf_of_draft == li) & ~cold)
        ds = ds[np.argsort(created[ds], kind="stable")]
        ranks = rng.permutation(len(ds))  # appeal rank is independent of age
        pools.append(
            _LeafPool(
                rows=row_of_draft[ds],
                created=created[ds],
                appeal=1.0 / (ranks + 1.0) ** 1.1,
                tier=np.array([drafts[int(d)].tier for d in ds]),
                brand=np.array([brand_index[drafts[int(d)].brand] for d in ds]),
            )
        )

    # --- complements, as leaf indices and as ' > '-joined paths
    leaf_index = {leaf.name: i for i, leaf in enumerate(leaves)}
    comp_idx: list[list[int]] = [[] for _ in leaves]
    for chain in _COMPLEMENT_CHAINS:
        for a, b in zip(chain, chain[1:], strict=False):
            if a in leaf_index and b in leaf_index and leaf_index[b] not in comp_idx[leaf_index[a]]:
                comp_idx[leaf_index[a]].append(leaf_index[b])
    complements = {leaves[a].key: [leaves[b].key for b in bs] for a, bs in enumerate(comp_idx) if bs}

    # --- users and their sessions
    sim = _Simulator(rng, config, pools, leaf_top, leaf_pop, comp_idx, len(tops))
    interactions: list[Interaction] = []
    width = max(4, len(str(config.n_users)))
    types = (InteractionType.VIEW, InteractionType.CART, InteractionType.PURCHASE)
    for u in range(config.n_users):
        user_id = f"U{u + 1:0{width}d}"
        for pos, (t, row, kind) in enumerate(sim.user()):
            interactions.append(
                Interaction(
                    user_id=user_id,
                    item_id=items[row].id,
                    type=types[kind],
                    timestamp=config.start + timedelta(seconds=t),
                    position=pos,
                )
            )

    brand_tiers = {b: TIERS[k] for t in tops for k, tier in enumerate(t.brands) for b in tier}
    return SyntheticData(
        items=items,
        interactions=interactions,
        complements=complements,
        cold_item_ids=[items[r].id for r in cold_rows],
        brand_tiers=brand_tiers,
        now=config.now,
        config=config,
    )


_VIEW, _CART, _PURCHASE = 0, 1, 2


class _Simulator:
    """Draws one user at a time: tastes first, then a sequence of sessions of (seconds, item row, event kind)."""

    def __init__(
        self,
        rng: np.random.Generator,
        config: SyntheticConfig,
        pools: list[_LeafPool],
        leaf_top: np.ndarray,
        leaf_pop: np.ndarray,
        comp_idx: list[list[int]],
        n_tops: int,
    ) -> None:
        self.rng = rng
        self.config = config
        self.pools = pools
        self.comp_idx = comp_idx
        self.span = config.days * 86400
        self.n_tops = n_tops
        self.top_leaves = [np.flatnonzero(leaf_top == c) for c in range(n_tops)]
        self.top_leaf_cum = [np.cumsum(leaf_pop[ls]) for ls in self.top_leaves]
        self.leaf_top = leaf_top
        self.top_pop = rng.gamma(3.0, 1.0, size=n_tops)  # some categories are busier than others
        # per-user state, set by user()
        self.events: list[tuple[int, int, int]] = []
        self.t = 0
        self.band = 1
        self.fav_brand = np.zeros(n_tops, dtype=np.int64)
        self.loyalty = 1.0

    def _pick(self, weights: np.ndarray) -> int:
        cum = np.cumsum(weights)
        return min(int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right")), len(weights) - 1)

    def _weights(self, leaf: int) -> tuple[_LeafPool, np.ndarray]:
        """This user's taste for the items of a leaf on sale now: appeal x price-band match x brand loyalty."""
        pool = self.pools[leaf]
        k = max(1, int(np.searchsorted(pool.created, self.t, side="right")))
        loyal = pool.brand[:k] == self.fav_brand[self.leaf_top[leaf]]
        w = pool.appeal[:k] * _TIER_MATCH[self.band, pool.tier[:k]] * np.where(loyal, self.loyalty, 1.0)
        return pool, w

    def _emit(self, row: int, kind: int, gap: float) -> None:
        self.t += int(gap)
        self.events.append((self.t, row, kind))

    def _browse(self, leaf: int, n_views: int, cart_p: float, side_leaf: int | None = None) -> bool:
        """View distinct items of a leaf (a few from `side_leaf` mixed in, more if the leaf has too few items on
        sale); with `cart_p` cart one of the leaf's items, and buy 60% of carted items. Returns whether it bought."""
        rng = self.rng
        pool, w = self._weights(leaf)
        n = min(n_views, len(w))
        viewed = np.argsort(-(np.log(w) + rng.gumbel(size=len(w))), kind="stable")[:n]  # weighted, no repeats
        side: list[int] = []
        if side_leaf is not None and n_views > 1:
            side_pool, side_w = self._weights(side_leaf)
            n_side = int(rng.binomial(n_views - 1, 0.2)) + n_views - n
            side = [int(side_pool.rows[self._pick(side_w)]) for _ in range(n_side)]
        views = [int(pool.rows[i]) for i in viewed] + side
        for v in rng.permutation(len(views)):
            self._emit(views[int(v)], _VIEW, 15 + rng.exponential(70.0))
        if rng.random() >= cart_p:
            return False
        chosen = int(pool.rows[viewed[self._pick(w[viewed])]])
        self._emit(chosen, _CART, 10 + rng.exponential(40.0))
        if rng.random() >= 0.6:
            return False
        self._emit(chosen, _PURCHASE, 60 + rng.exponential(240.0))
        return True

    def _complement(self, leaf: int) -> int | None:
        options = self.comp_idx[leaf]
        if not options or self.rng.random() >= self.config.complement_prob:
            return None
        return options[int(self.rng.integers(len(options)))]

    def user(self) -> list[tuple[int, int, int]]:
        rng, cfg = self.rng, self.config
        # Tastes: 2-4 favourite categories (busy categories are favoured more often), a price band, a loyal brand.
        k = int(rng.choice([2, 3, 4], p=[0.35, 0.4, 0.25]))
        k = min(k, self.n_tops)
        favs = rng.choice(self.n_tops, size=k, replace=False, p=self.top_pop / self.top_pop.sum())
        alpha = np.full(self.n_tops, 0.05)
        alpha[favs] = 2.0
        affinity = np.cumsum(rng.dirichlet(alpha))
        self.band = int(rng.choice(3, p=[0.35, 0.45, 0.2]))
        same_tier = rng.random(self.n_tops) < 0.7  # loyal brand usually in the user's own price band
        self.fav_brand = np.where(
            same_tier, 2 * self.band + rng.integers(0, 2, size=self.n_tops), rng.integers(0, 6, size=self.n_tops)
        )
        self.loyalty = 1.0 + 6.0 * float(rng.beta(2.0, 3.0))

        short = rng.random() < cfg.short_user_fraction
        n_sessions = 1 if short else int(rng.integers(cfg.sessions_per_user[0], cfg.sessions_per_user[1] + 1))
        first = int(rng.integers(0, int(self.span * 0.85)))
        last = first + int(rng.uniform(0.15, 1.0) * (self.span - 86400 - first))
        starts = np.sort(rng.integers(first, max(last, first + 1), size=n_sessions))

        self.events = []
        self.t = 0
        pending: int | None = None  # a complement leaf the user comes back for in the next session
        for s in starts:
            self.t = max(int(s), self.t + 1800)  # sessions never overlap
            if self.t >= self.span:
                break
            cat = min(int(np.searchsorted(affinity, rng.random() * affinity[-1], side="right")), self.n_tops - 1)
            leaves, cum = self.top_leaves[cat], self.top_leaf_cum[cat]
            leaf = int(leaves[min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(leaves) - 1)])
            others = leaves[leaves != leaf]
            side = int(others[int(rng.integers(len(others)))]) if len(others) else None
            if short:
                self._browse(leaf, int(rng.integers(2, 5)), cart_p=0.0, side_leaf=side)
                continue
            if pending is not None:
                leaf, chained, pending = pending, pending, None
                bought = self._browse(leaf, 1 + int(rng.integers(3)), cart_p=1.0)
            else:
                bought = self._browse(leaf, 2 + int(rng.poisson(2.5)), cart_p=0.42, side_leaf=side)
                chained = leaf
            # After a purchase the user often wants what goes with it: now, or when they come back.
            for _ in range(3):
                if not bought:
                    break
                target = self._complement(chained)
                if target is None:
                    break
                if rng.random() < 0.5:
                    pending = target
                    break
                bought = self._browse(target, 1 + int(rng.integers(3)), cart_p=1.0)
                chained = target
        return self.events


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """Write the synthetic shop as items.jsonl + events.jsonl: `python -m retrieval.synthetic --out DIR`."""
    parser = argparse.ArgumentParser(prog="python -m retrieval.synthetic", description=main.__doc__)
    parser.add_argument("--out", required=True, help="directory to write items.jsonl and events.jsonl into")
    parser.add_argument("--seed", type=int, default=SyntheticConfig.seed)
    parser.add_argument("--items", type=int, default=SyntheticConfig.n_items)
    parser.add_argument("--users", type=int, default=SyntheticConfig.n_users)
    args = parser.parse_args(argv)
    try:
        config = SyntheticConfig(seed=args.seed, n_items=args.items, n_users=args.users)
    except ValueError as e:
        parser.error(str(e))
    from retrieval.loaders import write_generic  # lazy: the loaders module is not needed to generate

    t0 = time.perf_counter()
    data = generate(config)
    write_generic(data.items, data.interactions, args.out)
    summary = data.summary()
    print(
        f"wrote {summary['items']} items and {summary['events']} events to {args.out} ({time.perf_counter() - t0:.1f}s)"
    )
    print(summary)


if __name__ == "__main__":
    main()
