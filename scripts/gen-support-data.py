#!/usr/bin/env python3
"""Generates the merchant-support intent dataset used by the quickstart, reproducibly.

Each row is a message a merchant might send to an e-commerce platform's support team, with
the intent a human triager would file it under. The messages are composed from templates
with slots (order numbers, carriers, amounts, products), greetings and sign-offs, casing and
typo noise, and occasional second sentences, so that the surface varies while the intent
stays unambiguous to a careful human reader.

    python3 scripts/gen-support-data.py --seed 7 --count 600 > examples/support-intent/support.jsonl

The same seed and count always give the same file (Python's `random.Random` is stable
across versions for these calls).
"""
import argparse
import json
import random
import sys

INTENTS = {
    "billing": [
        "Why was I charged {amount} twice on my last invoice?",
        "My subscription renewed at {amount} but my plan should be cheaper.",
        "I need a copy of the invoice for {month} for my accountant.",
        "How do I change the credit card you bill for my plan?",
        "There's a {amount} app charge on my bill that I never approved.",
        "Can you explain the transaction fees on this month's bill?",
        "I downgraded my plan but was still billed the old price.",
        "My card was declined for the monthly subscription, what happens now?",
        "Please add our VAT number to future invoices.",
        "I was billed for a store I closed in {month}.",
    ],
    "payouts": [
        "My payout for {month} still hasn't arrived in my bank account.",
        "Why is this week's payout {amount} less than my sales?",
        "How do I change the bank account my payouts go to?",
        "Payouts are on hold and I don't know why.",
        "When will the money from order {order} be deposited?",
        "Can I switch payouts from weekly to daily?",
        "A payout of {amount} failed and bounced back.",
        "My balance shows {amount} but nothing was paid out.",
    ],
    "shipping": [
        "Order {order} has been stuck in transit with {carrier} for a week.",
        "The {carrier} label I printed has the wrong return address.",
        "How do I offer free shipping on orders over {amount}?",
        "Tracking for order {order} hasn't updated since Monday.",
        "Shipping rates at checkout are way higher than what {carrier} charges me.",
        "Can I ship internationally with {carrier} from your dashboard?",
        "A customer says their parcel was marked delivered but never arrived.",
        "I need to buy labels in bulk for {count} orders.",
        "How do I set different shipping prices for heavy items like {product}?",
        "The package dimensions on my labels are wrong.",
    ],
    "returns": [
        "A customer wants to return the {product} from order {order}, how do I start it?",
        "How do I create a return label for a customer?",
        "Can I charge a restocking fee on returned {product}?",
        "A return arrived but I can't mark it as received.",
        "I want to set a 30-day return window for my store.",
        "The customer sent back the wrong item for return on order {order}.",
        "How do I exchange a {product} for a different size?",
        "Returned items aren't going back into stock automatically.",
    ],
    "account": [
        "I can't log in after changing my email address.",
        "Two-factor codes aren't arriving on my phone.",
        "How do I add a staff member who can only see orders?",
        "Please close my store and delete my data.",
        "I need to transfer store ownership to my business partner.",
        "Someone logged into my account from another country.",
        "I'm locked out after too many password attempts.",
        "How do I remove a former employee's access?",
    ],
    "inventory": [
        "My stock counts for {product} are wrong after the last sync.",
        "How do I track inventory across two warehouses?",
        "Variants of {product} show as sold out but I have {count} in stock.",
        "Can I import inventory levels from a spreadsheet?",
        "Low stock alerts stopped working for {product}.",
        "Inventory went negative when two orders came in at once.",
        "How do I stop selling {product} when it's out of stock?",
        "I need to adjust stock for {count} items after a stocktake.",
    ],
    "storefront": [
        "My checkout page shows a blank white screen.",
        "My theme broke after today's update.",
        "Product images load really slowly on mobile.",
        "How do I connect my own domain to the store?",
        "The homepage banner is cut off on phones.",
        "My store says 'page not found' for the {product} collection.",
        "Customers can't add {product} to the cart.",
        "How do I change the font on my product pages?",
    ],
    "integrations": [
        "The API returns 500 when I create a product.",
        "Webhooks for new orders aren't reaching my server.",
        "My accounting app stopped syncing orders since {month}.",
        "Which API scope do I need to read inventory levels?",
        "The marketplace integration is rejecting my {product} listings.",
        "I'm hitting rate limits with my custom app, what are the limits?",
        "Our ERP connector duplicates every order it imports.",
        "My API token stopped working after I rotated it.",
    ],
}

SLOTS = {
    "amount": ["$19", "$29.99", "$49", "$120", "$350", "€75", "£40", "$1,200"],
    "month": ["January", "March", "May", "August", "October", "last month"],
    "order": ["#1042", "#20931", "#5517", "#88210", "#3306", "#71994"],
    "carrier": ["UPS", "USPS", "FedEx", "DHL", "Canada Post", "Royal Mail"],
    "product": ["candles", "ceramic mugs", "linen shirts", "yoga mats", "phone cases", "gift boxes", "sneakers"],
    "count": ["3", "12", "40", "150", "a few hundred"],
}

GREETINGS = ["", "", "Hi, ", "Hello, ", "Hey team, ", "Hi there! ", "Good morning, ", "Quick question: "]
SIGNOFFS = ["", "", "", " Thanks!", " Thank you.", " Any help appreciated.", " - Maria, Bloom Candles",
            " Regards, Tom", " Please help asap."]
EXTRAS = {
    "billing": [" I've been a customer for two years.", " This is the second time it's happened."],
    "payouts": [" I have suppliers to pay this week.", " My bank says nothing is pending."],
    "shipping": [" The customer is getting impatient.", " It's a gift for a birthday."],
    "returns": [" They were polite about it.", " I want to keep the customer happy."],
    "account": [" I'm the store owner.", " This is urgent, I can't see my orders."],
    "inventory": [" We sell on two channels.", " It's causing overselling."],
    "storefront": [" I didn't change any code.", " It started this morning."],
    "integrations": [" We built the app in-house.", " Nothing changed on our side."],
}


def fill(template: str, rng: random.Random) -> str:
    out = template
    for name, values in SLOTS.items():
        while "{" + name + "}" in out:
            out = out.replace("{" + name + "}", rng.choice(values), 1)
    return out


def typo(text: str, rng: random.Random) -> str:
    """One adjacent-letter swap, the commonest human typo."""
    positions = [i for i in range(len(text) - 1) if text[i].isalpha() and text[i + 1].isalpha()]
    if not positions:
        return text
    i = rng.choice(positions)
    return text[:i] + text[i + 1] + text[i] + text[i + 2:]


def message(intent: str, rng: random.Random) -> str:
    body = fill(rng.choice(INTENTS[intent]), rng)
    if rng.random() < 0.25:
        body += rng.choice(EXTRAS[intent])
    greeting = rng.choice(GREETINGS)
    # After "Hi, " a sentence goes on in lower case, except for "I".
    if greeting.endswith(", ") and not (body.startswith("I ") or body.startswith("I'")):
        body = body[0].lower() + body[1:]
    text = greeting + body + rng.choice(SIGNOFFS)
    if rng.random() < 0.15:
        text = text.lower()
    if rng.random() < 0.2:
        text = typo(text, rng)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--count", type=int, default=600)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    intents = sorted(INTENTS)
    seen = set()
    rows = 0
    while rows < args.count:
        intent = intents[rows % len(intents)]
        text = message(intent, rng)
        if text in seen:
            continue
        seen.add(text)
        rows += 1
        sys.stdout.write(json.dumps({"id": f"m{rows:04d}", "prompt": text, "reference": intent}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
