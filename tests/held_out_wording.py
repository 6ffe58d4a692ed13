"""A held-out set for the SR28 matcher: everyday wordings a vision model gives a photo.

Written before any change to the matcher it measures, and never used to tune it. Each acceptable
NDB number was checked by hand against FOOD_DES.txt of SR28: every entry a person logging that
food would accept, and no other.

- precision = matches that fit / all matches made (dishes included: a dish matched to anything is
  a wrong match);
- recall = foods matched to a fitting food / foods.

HELD_OUT_FOODS are foods SR28 carries; HELD_OUT_DISHES are mixed dishes it carries in no fitting
form, for which the right answer is no match (the model keeps its own numbers).
"""

from __future__ import annotations

from tests.nutrition_labels import Label, _label

HELD_OUT_FOODS: tuple[Label, ...] = (
    # percentages; meat with no cooking word is on a plate, so its cooked forms
    _label("85% lean ground beef", "23568 23569 23570 23571"),
    _label("95% lean ground beef", "23558 23559 23560 23561"),
    _label("90% lean beef burger patty", "23563 23564", "grilled"),
    _label("93% lean ground turkey", "05666 05667"),
    _label("2% milk", "01079 01080 01081 01152 01174"),
    _label("1% low-fat milk", "01082 01083 01084 01175"),
    _label("70% cacao dark chocolate", "19904"),
    _label("0% fat greek yogurt", "01256"),
    _label("2% cottage cheese", "01015"),
    # plurals
    _label("fresh blueberries", "09050"),
    _label("raspberries", "09302"),
    _label("blackberries", "09042"),
    _label("cherries", "09070 09063"),
    _label("walnuts", "12155 12154 12157"),
    _label("pecans", "12142 12143 12144 12643 12644"),
    _label("pistachios", "12151 12152 12652"),
    # scallops and mussels on a plate are cooked; SR28's unbreaded cooked forms
    _label("scallops", "90240"),
    _label("mussels", "15165"),
    _label("chickpeas", "16057 16357 16058 16358 16359 16360"),
    _label("sardines", "15088 15089"),
    _label("pitted dates", "09087 09421"),
    _label("prunes", "09291"),
    # skin, skinless, bone-in
    _label("roasted chicken thigh with skin", "05094 05692 05351"),
    # no cooking word: any cooked form of the breast meat alone
    _label("skinless chicken breast", "05063 05064 05065 05342 05746 05747 05748 05749"),
    _label("bone-in chicken drumstick", "05069 05073 05343 05349 05679 05689", "baked"),
    _label("skinless chicken thigh", "05098 05345 05683", "grilled"),
    _label("baked potato with skin", "11674 11828 11356 11357 11358"),
    # cooking words
    _label("poached egg", "01131"),
    _label("hard boiled eggs", "01129"),
    _label("pan-seared tilapia", "15262"),
    _label("baked salmon fillet", "15086 15209 15210 15211 15212 15237 15239 15247"),
    _label("boiled shrimp", "15151 15271"),
    _label("steamed broccoli florets", "11091 11742 11093 11095 11743 11744"),
    _label("steamed asparagus", "11012 11705 11019 11709"),
    _label("sauteed spinach", "11458 11854 11464 11856"),
    _label("creamy mashed potatoes", "11371 11657 11934 31036 11379 11381 11383"),
    _label("fried sweet plantains", "09447"),
    _label("french toast", "18269 18268 21023"),
    # everyday names
    _label("fresh mozzarella", "01026 01028"),
    # string cheese is low-moisture part-skim mozzarella, or part-skim mozzarella
    _label("string cheese", "01029 01028"),
    _label("cheddar", "01009 01270"),
    _label("feta crumbles", "01019"),
    _label("grated parmesan", "01032"),
    _label("swiss cheese slice", "01040"),
    _label("half and half", "01049"),
    _label("almond milk", "14091 14016"),
    _label("soy milk", "16120 16139 16222"),
    _label("smoked salmon", "15077 15179"),
    _label("navel orange", "09202 09200"),
    _label("granny smith apple", "09502 09003"),
    _label("cantaloupe", "09181"),
    _label("honeydew melon", "09184"),
    _label("sliced avocado", "09037 09038 09039"),
    _label("baby carrots", "11960"),
    _label("cherry tomatoes", "11529"),
    _label("chopped romaine", "11251"),
    _label("iceberg lettuce", "11252"),
    _label("baby spinach", "11457"),
    _label("english muffin", "18258 18437 18438 18439 18259"),
    _label("bagel", "18001 18406 18407 18408"),
    _label("sourdough bread", "18029"),
    _label("rye bread", "18060"),
    _label("slice of whole wheat bread", "18075 18077"),
    _label("whole wheat pita", "18042"),
    _label("flour tortilla", "18364 18450 18970"),
    # rice is eaten cooked
    _label("brown rice", "20037 20041"),
    # SR28 carries sweet potato fries only as the frozen product
    _label("sweet potato fries", "31023 31024"),
)

HELD_OUT_DISHES: tuple[str, ...] = (
    "shakshuka",
    "bibimbap",
    "seafood paella",
    "salmon poke bowl",
    "butter chicken",
    "massaman curry",
    "chicken shawarma plate",
    "banh mi sandwich",
    "khachapuri",
    "jollof rice",
    "chicken biryani",
    "moussaka",
    "lamb tagine",
    "beef bulgogi",
    "shrimp ceviche",
    "pork gyoza",
    "vegetable samosas",
    "tom yum soup",
)
