"""A small shop: products, customers, orders and what they cost."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date


class OutOfStock(Exception):
    """An order asked for more than the shop has."""


@dataclass
class Product:
    sku: str
    name: str
    price: float
    stock: int = 0

    def restock(self, count: int) -> None:
        if count <= 0:
            raise ValueError("count must be positive")
        self.stock += count

    def take(self, count: int) -> None:
        if count > self.stock:
            raise OutOfStock(f"{self.name}: {count} asked, {self.stock} left")
        self.stock -= count


@dataclass
class Customer:
    name: str
    email: str
    member: bool = False

    def discount(self) -> float:
        return 0.1 if self.member else 0.0


@dataclass
class Line:
    product: Product
    count: int

    def subtotal(self) -> float:
        return round(self.product.price * self.count, 2)


@dataclass
class Order:
    customer: Customer
    day: date
    lines: list[Line] = field(default_factory=list)
    shipped: bool = False

    def add(self, product: Product, count: int) -> None:
        for line in self.lines:
            if line.product.sku == product.sku:
                line.count += count
                return
        self.lines.append(Line(product, count))

    def remove(self, sku: str) -> None:
        self.lines = [line for line in self.lines if line.product.sku != sku]

    def items(self) -> int:
        return sum(line.count for line in self.lines)

    def total_price(self) -> float:
        gross = sum(line.subtotal() for line in self.lines)
        return round(gross * (1 - self.customer.discount()), 2)

    def ship(self) -> None:
        if self.shipped:
            raise ValueError("already shipped")
        for line in self.lines:
            line.product.take(line.count)
        self.shipped = True


class Shop:
    def __init__(self, name: str):
        self.name = name
        self.products: dict[str, Product] = {}
        self.customers: dict[str, Customer] = {}
        self.orders: list[Order] = []

    def add_product(self, sku: str, name: str, price: float, stock: int = 0) -> Product:
        if sku in self.products:
            raise ValueError(f"duplicate sku {sku}")
        product = Product(sku, name, price, stock)
        self.products[sku] = product
        return product

    def add_customer(self, name: str, email: str, member: bool = False) -> Customer:
        customer = Customer(name, email, member)
        self.customers[email] = customer
        return customer

    def order(self, email: str, day: date, wanted: dict[str, int]) -> Order:
        customer = self.customers[email]
        order = Order(customer, day)
        for sku, count in wanted.items():
            order.add(self.products[sku], count)
        self.orders.append(order)
        return order

    def ship_all(self) -> list[Order]:
        shipped = []
        for order in self.orders:
            if order.shipped:
                continue
            try:
                order.ship()
            except OutOfStock:
                continue
            shipped.append(order)
        return shipped

    def revenue(self, since: date | None = None) -> float:
        total = 0.0
        for order in self.orders:
            if not order.shipped:
                continue
            if since is not None and order.day < since:
                continue
            total += order.total_price()
        return round(total, 2)

    def low_stock(self, below: int = 5) -> list[Product]:
        return sorted((p for p in self.products.values() if p.stock < below), key=lambda p: p.stock)

    def best_customers(self, top: int = 3) -> list[tuple[str, float]]:
        spent: dict[str, float] = {}
        for order in self.orders:
            if order.shipped:
                spent[order.customer.email] = spent.get(order.customer.email, 0.0) + order.total_price()
        return sorted(spent.items(), key=lambda item: item[1], reverse=True)[:top]

    def to_json(self) -> str:
        return json.dumps({
            "name": self.name,
            "products": [vars(p) for p in self.products.values()],
            "customers": [vars(c) for c in self.customers.values()],
            "orders": len(self.orders),
        }, indent=2)


def demo() -> None:
    shop = Shop("Corner Shop")
    shop.add_product("A1", "Apple", 0.5, 100)
    shop.add_product("B2", "Bread", 2.25, 20)
    shop.add_product("C3", "Cheese", 6.0, 4)
    shop.add_customer("Ada", "ada@example.com", member=True)
    shop.add_customer("Bob", "bob@example.com")
    shop.order("ada@example.com", date(2024, 5, 1), {"A1": 6, "B2": 1})
    shop.order("bob@example.com", date(2024, 5, 2), {"C3": 5})
    shop.ship_all()
    print(shop.revenue(), shop.low_stock(), shop.best_customers())


if __name__ == "__main__":
    demo()
